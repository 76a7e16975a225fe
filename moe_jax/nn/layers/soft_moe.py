"""Soft MoE: every slot is a convex mix of a sequence's tokens, every token a convex mix
of the slots' outputs (Puigcerver et al., "From Sparse to Soft Mixtures of Experts",
arXiv:2308.00951).

Axis letters: B sequences (routing groups), S tokens per sequence, D model dim,
E experts, C slots per expert (the capacity of each expert per sequence), X = B*C rows
per expert, N devices on the expert axis.

Per sequence X [S, D] and slot parameters Phi [D, E*C] (Section 2.1, Algorithm 1):
  logits = X Phi
  dispatch D = softmax over the S tokens (each slot's column sums to 1)
  combine  C = softmax over the E*C slots (each token's row sums to 1)
  slots X~ = D^T X; expert e runs on its C rows of X~; Y = C Y~.
Normalisation (Section 2.3): X and Phi's columns are L2-normalised and Phi is scaled
by a learned scalar (init 1), so logits do not blow up with the model width.

Selected by `MoEConfig.layer = dict(name="soft_moe", slots_per_expert=1)`. It uses
num_experts, expert_hidden_dim, activation and experts of MoEConfig; the router,
dispatch and capacity fields do not apply (there is no routing decision). It has no
load-balance loss (every expert gets exactly its slots): it sows two metrics into
"moe_metrics" and no "aux_loss". Soft MoE mixes tokens across positions, so a causal
stack rejects it (TransformerConfig checks `causal_ok`). Under a mesh whose `expert`
axis is > 1 the slot buffers are constrained to that axis (GSPMD shards the experts;
no shard_map exchange).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax import validation as V
from moe_jax.config import MoEConfig
from moe_jax.nn import losses
from moe_jax.nn.context import Context
from moe_jax.nn.experts import EXPERTS
from moe_jax.nn.layers import MOE_LAYERS
from moe_jax.parallel.expert_parallel import expert_axis_size


def l2_normalize(x: jax.Array, axis: int) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + 1e-6)


@MOE_LAYERS.register("soft_moe")
class SoftMoELayer(nn.Module):
  """Soft MoE over [..., S, D]: each sequence of S tokens is one group.

  `token_mask` ([..., S], False = padding) gives padding no dispatch weight, so padding
  never reaches a slot; padded positions come out 0. Sows the dispatch and combine
  weights (float32 [B, S, E, C]) into "intermediates" when that collection is mutable.
  """

  config: MoEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  slots_per_expert: int = 1  # C: slots each expert processes per sequence
  normalize: bool = True  # the paper's L2 normalisation + learned scale (Section 2.3)

  causal_ok = False  # mixes tokens across positions: a decoder must not use it

  @staticmethod
  def check_options(slots_per_expert: int = 1, normalize: bool = True) -> None:
    V.check_int_range("layer.slots_per_expert", slots_per_expert, lo=1)
    if not isinstance(normalize, bool):
      raise ValueError(f"layer.normalize={normalize!r} must be True or False")

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True, context: Context | None = None,
               token_mask: jax.Array | None = None) -> jax.Array:
    del deterministic, context  # no noise; the slots do not condition on context
    cfg = self.config
    if x.ndim < 2:
      raise ValueError(f"soft_moe input must be [..., S, D]; got shape {tuple(x.shape)}")
    if token_mask is not None and token_mask.shape != x.shape[:-1]:
      raise ValueError(f"soft_moe token_mask has shape {tuple(token_mask.shape)}; expected the "
                       f"input's leading shape {tuple(x.shape[:-1])}")
    if cfg.num_shared_experts:
      raise ValueError("soft_moe has no shared experts; set num_shared_experts=0")
    S, D = x.shape[-2:]
    E, C = cfg.num_experts, self.slots_per_expert
    x_BSD = x.reshape(-1, S, D)
    B = x_BSD.shape[0]

    # Logits in float32, as for every router.
    phi_DEC = self.param("slots_DEC", nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
                         (D, E, C), self.param_dtype).astype(jnp.float32)
    xf_BSD = x_BSD.astype(jnp.float32)
    if self.normalize:
      scale = self.param("slots_scale", nn.initializers.ones_init(), (), self.param_dtype)
      xf_BSD = l2_normalize(xf_BSD, axis=-1)
      phi_DEC = l2_normalize(phi_DEC, axis=0) * scale.astype(jnp.float32)
    logits_BSEC = jnp.einsum("BSD,DEC->BSEC", xf_BSD, phi_DEC)
    if token_mask is not None:
      # A large finite value, not -inf: an all-padding sequence stays finite (uniform
      # weights over its padding, whose outputs are zeroed below).
      real_BS11 = token_mask.reshape(B, S, 1, 1)
      dispatch_logits = jnp.where(real_BS11, logits_BSEC, jnp.finfo(jnp.float32).min / 2)
    else:
      dispatch_logits = logits_BSEC
    dispatch_BSEC = jax.nn.softmax(dispatch_logits, axis=1)  # over the tokens of a sequence
    combine_BSEC = jax.nn.softmax(logits_BSEC.reshape(B, S, E * C), axis=-1).reshape(
        B, S, E, C)  # over all slots
    self.sow("intermediates", "dispatch_BSEC", dispatch_BSEC)
    self.sow("intermediates", "combine_BSEC", combine_BSEC)

    # Slots -> experts (the bank's dense [E, X, D] path, X = B*C) -> tokens.
    x_BSD = x_BSD.astype(self.dtype)
    slots_EBCD = jnp.einsum("BSEC,BSD->EBCD", dispatch_BSEC.astype(self.dtype), x_BSD)
    experts = EXPERTS.get(cfg.experts)(E, cfg.expert_hidden_dim, cfg.activation, self.dtype,
                                       self.param_dtype, name="experts")(D)
    slots_EXD = slots_EBCD.reshape(E, B * C, D)
    N = expert_axis_size()
    if N > 1:  # each device runs the slots of its own experts
      if E % N:
        raise ValueError(f"soft_moe num_experts={E} is not divisible by mesh.expert={N}")
      slots_EXD = jax.lax.with_sharding_constraint(slots_EXD, P("expert"))
    out_EXD = experts.batched(slots_EXD)
    if N > 1:
      out_EXD = jax.lax.with_sharding_constraint(out_EXD, P("expert"))
    y_BSD = jnp.einsum("BSEC,EBCD->BSD", combine_BSEC.astype(self.dtype),
                       out_EXD.reshape(E, B, C, D))
    if token_mask is not None:
      y_BSD = y_BSD * token_mask.reshape(B, S, 1).astype(y_BSD.dtype)

    if not self.is_initializing():  # as MoELayer: init() returns parameters only
      real_BS = None if token_mask is None else token_mask.reshape(B * S)
      self.sow(losses.METRICS_COLLECTION, "moe", {
          # 1/(E*C) when a token mixes every slot evenly, 1 when it reads one slot.
          "combine_weight_max": losses.token_mean(combine_BSEC.reshape(B * S, E * C).max(-1),
                                                  real_BS),
          # 1/S when a slot averages its sequence, 1 when it copies one token.
          "dispatch_weight_max": dispatch_BSEC.max(axis=1).mean(),
      })
    return y_BSD.reshape(x.shape).astype(self.dtype)
