"""Pre-norm transformer stacks (bidirectional encoder, causal decoder) with MoE layers.

Axis letters: B batch, S sequence, D model dim.

Which layers are MoE comes from `TransformerConfig` (every N-th, last N, or an
explicit list). With `scan_layers`, the stack is cut into repeating units (e.g.
[dense, MoE] x 6 for "every 2nd", or 6 dense then 6 MoE for "last 6 of 12") and
each unit is `nn.scan`ned, so compile time does not grow with depth.
"""
from __future__ import annotations

import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.nn.attention import ATTENTIONS, LatentAttention
from moe_jax.nn.context import Context
from moe_jax.config import TransformerConfig
from moe_jax.nn.experts import FeedForward
from moe_jax.nn.layers import make_moe_layer
from moe_jax.nn.untied import UntiedBlock


class Block(nn.Module):
  """x + Attn(Norm(x)); then x + FFN(Norm(x)) where FFN is dense or MoE."""

  config: TransformerConfig
  use_moe: bool = False
  deterministic: bool = True
  decode: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  num_experts: int | None = None  # this MoE layer's E (Pyramid-MoE); None: config.moe's

  @nn.compact
  def __call__(self, x_BSD: jax.Array, mask_BS: jax.Array | None = None,
               positions_BS: jax.Array | None = None,
               context: Context | None = None) -> jax.Array:
    cfg = self.config
    norm = lambda name: nn.RMSNorm(cfg.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                   name=name)
    drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
    if cfg.mla is not None:  # DeepSeek-style multi-head latent attention
      attention = LatentAttention(cfg.num_heads, cfg.mla, cfg.rope_max_wavelength,
                                  decode=self.decode, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name="attention")
    else:
      # cfg.attention: "mha" (SelfAttention) or a registered variant with its options (moh)
      attention = ATTENTIONS.get(cfg.attention.name)(
                                cfg.num_heads, cfg.resolved_head_dim, causal=cfg.causal,
                                rope=cfg.uses_rope, rope_max_wavelength=cfg.rope_max_wavelength,
                                num_kv_heads=cfg.num_kv_heads, qkv_bias=cfg.qkv_bias,
                                qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps,
                                sliding_window=cfg.sliding_window, decode=self.decode,
                                dtype=self.dtype, param_dtype=self.param_dtype, name="attention",
                                **cfg.attention.kwargs())
    h = attention(norm("attention_norm")(x_BSD), mask_BS=mask_BS, positions_BS=positions_BS)
    x_BSD = x_BSD + drop(h)
    h = norm("ffn_norm")(x_BSD)
    if self.use_moe:
      moe_cfg = cfg.moe if self.num_experts is None else cfg.moe_config_for(self.num_experts)
      h = make_moe_layer(moe_cfg, self.dtype, self.param_dtype)(
          h, deterministic=self.deterministic, context=context, token_mask=mask_BS)
    else:
      h = FeedForward(cfg.mlp_dim, cfg.activation, self.dtype, self.param_dtype, name="mlp")(h)
    return x_BSD + drop(h)


class _Unit(nn.Module):
  """Consecutive blocks following `pattern` (0 or False: dense; True: MoE; an int: MoE
  with that many experts); the body that gets scanned."""

  config: TransformerConfig
  pattern: tuple[int, ...]
  deterministic: bool = True
  decode: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scanned: bool = False

  @nn.compact
  def __call__(self, x_BSD, mask_BS, positions_BS, context):
    for i, kind in enumerate(self.pattern):
      # An untied (MoT) layer is (kind, True) in the pattern; see TransformerStack. A kind
      # is True/False (MoE or dense) or, with moe_num_experts, a layer's expert count.
      kind, untied = kind if isinstance(kind, tuple) else (kind, False)
      block = UntiedBlock if untied else Block
      if self.config.remat:
        block = nn.remat(block, prevent_cse=not self.scanned)
      extra = {} if untied else {"num_experts": None if isinstance(kind, bool) else kind or None}
      x_BSD = block(self.config, bool(kind), self.deterministic, self.decode, self.dtype,
                    self.param_dtype, name=f"block_{i}", **extra)(x_BSD, mask_BS, positions_BS,
                                                                    context)
    return (x_BSD, None) if self.scanned else x_BSD


def scan_plan(pattern: tuple[int, ...]) -> list[tuple[tuple[int, ...], int]]:
  """Cuts a layer pattern (a kind per layer: dense, MoE, or MoE with E experts) into
  (unit, repeats) pieces to scan over; only layers of one kind share parameter shapes.

  The shortest period that tiles the whole stack is used when there is one
  (every-N placement); otherwise runs of equal layers (last-N, explicit lists). With
  per-layer expert counts (more than two kinds: Pyramid-MoE) runs of equal units of
  p layers are tried too and the cut that traces the fewest layers wins ([dense, E4] x 2
  + [dense, E8] x 2 traces four blocks, not eight); two-kind patterns keep their cut.
  """
  L = len(pattern)
  for p in range(1, L):
    if L % p == 0 and all(pattern[i] == pattern[i % p] for i in range(L)):
      return [(pattern[:p], L // p)]
  plan = [((kind,), len(list(run))) for kind, run in itertools.groupby(pattern)]
  traced = lambda plan: sum(len(unit) for unit, _ in plan)  # blocks compiled
  if len(set(pattern)) > 2:
    for p in range(2, L):
      if L % p == 0:
        units = [pattern[i:i + p] for i in range(0, L, p)]
        runs = [(unit, len(list(run))) for unit, run in itertools.groupby(units)]
        plan = runs if traced(runs) < traced(plan) else plan
  return plan


class TransformerStack(nn.Module):
  """A stack of pre-norm blocks and a final norm: [B, S, D] -> [B, S, D].

  `config.causal` makes it a decoder (causal mask; RoPE unless config.rope=False);
  otherwise a bidirectional encoder. `mask_BS` marks real (True) vs padding keys;
  `context` (one row per example) reaches every MoE layer's router.
  """

  config: TransformerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BSD: jax.Array, *, mask_BS: jax.Array | None = None,
               positions_BS: jax.Array | None = None, context: Context | None = None,
               deterministic: bool = True, decode: bool = False) -> jax.Array:
    """`decode`: each attention layer keeps its keys and values in the "cache"
    collection and attends over them (generation; moe_jax/inference)."""
    cfg = self.config
    if x_BSD.ndim != 3 or x_BSD.shape[-1] != cfg.d_model:
      raise ValueError(f"TransformerStack input must be [batch, seq, d_model={cfg.d_model}]; "
                       f"got shape {tuple(x_BSD.shape)}")
    if mask_BS is not None and mask_BS.shape != x_BSD.shape[:2]:
      raise ValueError(f"mask_BS shape {tuple(mask_BS.shape)} does not match [batch, seq] "
                       f"{tuple(x_BSD.shape[:2])}")
    experts = cfg.moe_experts_by_layer()
    if cfg.moe_num_experts:  # Pyramid-MoE: a layer's kind is its expert count
      pattern = tuple(experts.get(i, 0) for i in range(cfg.num_layers))
    else:
      pattern = tuple(i in experts for i in range(cfg.num_layers))
    if cfg.untied_layers:  # per-modality layers are a kind of their own for scan_plan
      pattern = tuple((kind, i in cfg.untied_layers) for i, kind in enumerate(pattern))
    common = dict(config=cfg, deterministic=deterministic, decode=decode, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    if not cfg.scan_layers:
      x_BSD = _Unit(pattern=pattern, name="layers", **common)(x_BSD, mask_BS, positions_BS,
                                                              context)
    else:
      for j, (unit, repeats) in enumerate(scan_plan(pattern)):
        scanned = nn.scan(_Unit, variable_axes={True: 0},
                          split_rngs={"params": True, "dropout": True, "jitter": True},
                          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=repeats)
        x_BSD, _ = scanned(pattern=unit, scanned=True, name=f"scan_{j}", **common)(
            x_BSD, mask_BS, positions_BS, context)
    return nn.RMSNorm(cfg.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="final_norm")(x_BSD)
