"""Token-choice top-k router (Shazeer et al. 2017, arXiv:1701.06538; Switch, arXiv:2101.03961).

Axis letters: T tokens, D model dim, E experts, K slots per token.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import validation as V
from moe_jax.nn import losses
from moe_jax.nn.routing.base import ROUTERS, RoutingDecision, check_token_mask, router_logits


@ROUTERS.register("top_k")
class TopKRouter(nn.Module):
  """Token choice: softmax over experts, then each token takes its top-k.

  Options: `k` slots per token; `renormalize` rescales the k weights to sum to 1
  (never for k=1: p/p = 1 would cut the router off from the task gradient, so a
  single slot is gated by its probability as in Switch); `batch_priority` sets
  `priority_T` to each token's top router probability, so capacity-limited
  dispatch keeps confident tokens first (V-MoE's batch priority routing,
  arXiv:2106.05974); `jitter` multiplies router inputs by U(1-jitter, 1+jitter)
  while training (rng "jitter"); `fused` runs softmax -> top-k -> renormalise in the
  kernels_pallas router kernel, which also returns each slot's position in its
  expert group (the tile layout then needs no sort); logits and aux losses stay in XLA.
  """

  num_experts: int
  k: int = 2
  renormalize: bool = True
  batch_priority: bool = False
  jitter: float = 0.0
  fused: bool = False
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    V.check_int_range("num_experts", self.num_experts, lo=1)
    V.check_int_range("k", self.k, lo=1, hi=self.num_experts)
    V.check_fraction("jitter", self.jitter)
    super().__post_init__()

  @nn.compact
  def __call__(self, x_TD: jax.Array, context: Any = None, *, deterministic: bool = True,
               token_mask_T: jax.Array | None = None) -> RoutingDecision:
    del context  # not a conditioned router
    valid_T = check_token_mask(token_mask_T, x_TD)
    logits_TE = router_logits(self, x_TD, self.num_experts, self.jitter, deterministic,
                              self.param_dtype)
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    renormalize = self.renormalize and self.k > 1
    position_TK = counts_E = None
    if self.fused:
      from kernels_pallas.router import fused_top_k_router  # pylint: disable=import-outside-toplevel
      index_TK, weight_TK, position_TK, counts_E = fused_top_k_router(
          logits_TE, k=self.k, renormalize=renormalize)
      top_prob_T = jnp.max(probs_TE, axis=-1)
    else:
      prob_TK, index_TK = jax.lax.top_k(probs_TE, self.k)
      top_prob_T = prob_TK[:, 0]
      weight_TK = prob_TK / jnp.sum(prob_TK, axis=-1, keepdims=True) if renormalize else prob_TK
    assigned_TE = jax.nn.one_hot(index_TK, self.num_experts, dtype=jnp.float32).sum(1)
    mask_TK = None
    if valid_T is not None:
      assigned_TE = assigned_TE * valid_T[:, None]
      mask_TK = jnp.broadcast_to(valid_T[:, None] > 0, index_TK.shape)
      position_TK = counts_E = None  # the kernel's layout counted padding; dispatch re-sorts
    aux = {
        "load_balance_loss": losses.load_balance_loss(probs_TE, assigned_TE, valid_T),
        "z_loss": losses.router_z_loss(logits_TE, valid_T),
        "expert_load_E": losses.token_mean(assigned_TE, valid_T) / self.k,
        "dropped_fraction": jnp.zeros((), jnp.float32),  # the dispatcher may overwrite
        "router_entropy": losses.router_entropy(probs_TE, valid_T),
    }
    return RoutingDecision(
        expert_index_TK=index_TK.astype(jnp.int32),
        weight_TK=weight_TK,
        mask_TK=mask_TK,
        priority_T=top_prob_T if self.batch_priority else None,
        logits_TE=logits_TE,
        aux=aux,
        position_TK=position_TK,
        counts_E=counts_E)
