"""Expert-choice router: each expert picks its tokens (Zhou et al. 2022, arXiv:2202.09368).

Axis letters: T tokens, D model dim, E experts, K slots per token (K = E here),
G groups, S tokens per group, C capacity per expert and group.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import validation as V
from moe_jax.nn import losses
from moe_jax.nn.routing.base import (ROUTERS, RoutingDecision, check_token_mask,
                                     resolve_group_size, router_logits)


def expert_choice_capacity(group_size: int, num_experts: int, capacity_factor: float,
                           min_capacity: int = 1) -> int:
  """C = round(capacity_factor * S / E), clipped to [max(min_capacity, 1), S]."""
  c = int(round(capacity_factor * group_size / num_experts))
  return min(max(c, min_capacity, 1), group_size)


@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(nn.Module):
  """Expert choice (arXiv:2202.09368): each expert takes its top-C tokens per group.

  Scores are softmax over experts per token; expert e keeps the C tokens of each
  group with the highest score for e and combines with that score. Load is
  perfectly balanced by construction, so `load_balance_loss` is 0; a token may
  get 0..E experts and `dropped_fraction` is the share of tokens with none.
  With a padding mask, C is counted from each group's real tokens,
  round(capacity_factor * real / E) clipped to [min_capacity, real], so padding
  a sequence further changes nothing; `capacity` stays the padded-size bound.
  Note: a token's experts depend on the other tokens of its group, so this
  router is not causal.
  """

  num_experts: int
  capacity_factor: float = 1.0
  eval_capacity_factor: float | None = None
  group_size: int | None = None
  min_capacity: int = 1
  jitter: float = 0.0
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    V.check_int_range("num_experts", self.num_experts, lo=1)
    V.check_positive("capacity_factor", self.capacity_factor)
    V.check_fraction("jitter", self.jitter)
    super().__post_init__()

  @nn.compact
  def __call__(self, x_TD: jax.Array, context: Any = None, *, deterministic: bool = True,
               token_mask_T: jax.Array | None = None) -> RoutingDecision:
    del context  # not a conditioned router
    valid_T = check_token_mask(token_mask_T, x_TD)
    num_tokens, E = x_TD.shape[0], self.num_experts
    S = resolve_group_size(num_tokens, self.group_size)
    G = num_tokens // S
    cf = self.capacity_factor
    if deterministic and self.eval_capacity_factor is not None:
      cf = self.eval_capacity_factor
    C = expert_choice_capacity(S, E, cf, self.min_capacity)

    logits_TE = router_logits(self, x_TD, E, self.jitter, deterministic, self.param_dtype)
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    scores_TE = probs_TE if valid_T is None else jnp.where(valid_T[:, None] > 0, probs_TE, -1.0)
    scores_GES = scores_TE.reshape(G, S, E).transpose(0, 2, 1)
    gate_GEC, token_GEC = jax.lax.top_k(scores_GES, C)
    keep_GEC = jnp.ones(gate_GEC.shape, bool)
    if valid_T is not None:  # padding ranks last; capacity from each group's real tokens
      real_G = valid_T.reshape(G, S).sum(1)
      cap_G = jnp.clip(jnp.round(cf * real_G / E), max(self.min_capacity, 1), C)
      cap_G = jnp.minimum(cap_G, real_G)
      keep_GEC = (jnp.arange(C)[None, None, :] < cap_G[:, None, None]) & (gate_GEC >= 0)
    # Scatter the (expert, slot) picks back to a [G, S, E] table of weights.
    g_GEC = jnp.arange(G)[:, None, None] + jnp.zeros_like(token_GEC)
    e_GEC = jnp.arange(E)[None, :, None] + jnp.zeros_like(token_GEC)
    weight_GSE = jnp.zeros((G, S, E), jnp.float32).at[g_GEC, token_GEC, e_GEC].set(
        jnp.where(keep_GEC, gate_GEC, 0.0))
    mask_GSE = jnp.zeros((G, S, E), bool).at[g_GEC, token_GEC, e_GEC].set(keep_GEC)
    mask_TE = mask_GSE.reshape(num_tokens, E)
    assigned_TE = mask_TE.astype(jnp.float32)
    routed_T = mask_TE.any(-1).astype(jnp.float32)
    aux = {
        "load_balance_loss": jnp.zeros((), jnp.float32),
        "z_loss": losses.router_z_loss(logits_TE, valid_T),
        "expert_load_E": assigned_TE.sum(0) / jnp.maximum(assigned_TE.sum(), 1.0),
        "dropped_fraction": 1.0 - losses.token_mean(routed_T, valid_T),
        "router_entropy": losses.router_entropy(probs_TE, valid_T),
    }
    index_TK = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (num_tokens, E))
    return RoutingDecision(
        expert_index_TK=index_TK,
        weight_TK=weight_GSE.reshape(num_tokens, E),
        mask_TK=mask_TE,
        logits_TE=logits_TE,
        aux=aux,
        capacity=C,
        group_size=S)
