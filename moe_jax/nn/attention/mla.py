"""Multi-head latent attention (MLA), DeepSeek-V2 (arXiv:2405.04434) and V3 (arXiv:2412.19437).

Axis letters: B batch, S sequence, D model dim, H heads. The projections here map
between widths the legend has no letters for (the low-rank latents, the rotary and
non-rotary parts of a head), so they are plain Dense kernels named after their role,
replicated by the partitioning rules (they are small next to the expert banks).

Queries: x -> q_a_proj (q_lora_rank) -> RMSNorm -> q_b_proj -> H heads of
[qk_nope_head_dim | qk_rope_head_dim] (or one q_proj when q_lora_rank is None).
Keys and values: x -> kv_a_proj -> [latent (kv_lora_rank) | one rotary key shared by all
heads (qk_rope_head_dim)]; the latent -> RMSNorm -> kv_b_proj -> H heads of
[k_nope | v]. RoPE acts on the rotary parts only; with `rope_interleave` (DeepSeek-V3's
layout) their features are stored as interleaved pairs and de-interleaved first. The
softmax scale is 1/sqrt(qk_nope_head_dim + qk_rope_head_dim).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config import MLAConfig
from moe_jax.nn.attention.mha import apply_rope, attend_with_cache


def deinterleave(x: jax.Array) -> jax.Array:
  """[..., (x0, x1), (x2, x3), ...] -> [..., x0, x2, ..., x1, x3, ...]: interleaved pairs
  into the first-half / second-half layout apply_rope rotates."""
  return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


class LatentAttention(nn.Module):
  """Causal multi-head latent attention; `decode` keeps keys and values in the cache."""

  num_heads: int
  config: MLAConfig
  rope_max_wavelength: float = 10_000.0
  decode: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BSD: jax.Array, *, mask_BS: jax.Array | None = None,
               positions_BS: jax.Array | None = None) -> jax.Array:
    cfg, H = self.config, self.num_heads
    B, S, D = x_BSD.shape
    nope, rope, v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
    norm = lambda name: nn.RMSNorm(cfg.latent_norm_eps, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=name)
    x_BSD = x_BSD.astype(self.dtype)
    if cfg.q_lora_rank is None:
      q = dense(H * (nope + rope), "q_proj")(x_BSD)
    else:
      q = dense(H * (nope + rope), "q_b_proj")(norm("q_a_norm")(
          dense(cfg.q_lora_rank, "q_a_proj")(x_BSD)))
    q_pass, q_rot = jnp.split(q.reshape(B, S, H, nope + rope), [nope], axis=-1)
    latent, k_rot = jnp.split(dense(cfg.kv_lora_rank + rope, "kv_a_proj")(x_BSD),
                              [cfg.kv_lora_rank], axis=-1)
    kv = dense(H * (nope + v_dim), "kv_b_proj")(norm("kv_a_norm")(latent))
    k_pass, v = jnp.split(kv.reshape(B, S, H, nope + v_dim), [nope], axis=-1)
    k_rot = k_rot[:, :, None, :]  # one rotary key for every head
    if cfg.rope_interleave:
      q_rot, k_rot = deinterleave(q_rot), deinterleave(k_rot)
    if positions_BS is None:
      positions_BS = jnp.broadcast_to(jnp.arange(S), (B, S))
    q_rot = apply_rope(q_rot, positions_BS, self.rope_max_wavelength)
    k_rot = apply_rope(k_rot, positions_BS, self.rope_max_wavelength)
    q = jnp.concatenate([q_pass, q_rot], axis=-1)
    k = jnp.concatenate([k_pass, jnp.broadcast_to(k_rot, (B, S, H, rope))], axis=-1)
    # Values are narrower than queries and keys: padded with zeros to their width for the
    # attention kernel, the padding cut off after.
    v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, nope + rope - v_dim)))
    if self.decode:
      o = attend_with_cache(self, q, k, v, mask_BS)
    else:
      mask = None if mask_BS is None else mask_BS[:, None, None, :].astype(bool)
      o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
    o = o[..., :v_dim].reshape(B, S, H * v_dim)
    return dense(D, "o_proj")(o)
