"""One-hot dispatch with a fixed capacity per expert and group (GShard, arXiv:2006.16668;
V-MoE batch priority, arXiv:2106.05974).

Axis letters: T tokens, D model dim, E experts, K slots per token,
G groups, S tokens per group, C capacity per expert and group.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.nn.dispatch.base import (DISPATCHERS, CapacityOptions, Metrics, check_inputs,
                                      zero_drops)
from moe_jax.nn.experts import ExpertWeights
from moe_jax.nn.routing import RoutingDecision, resolve_group_size, token_choice_capacity


def assign_capacity_slots(decision: RoutingDecision, num_experts: int, group_size: int,
                          capacity: int) -> tuple[jax.Array, jax.Array]:
  """Position of each slot in its expert's buffer, and whether it fits.

  Within each group, slots fill their expert's C places in order: all first
  choices before any second choice (Switch/V-MoE), and within one choice rank by
  token order or, when `decision.priority_T` is set, by descending priority.
  Returns (position_TK int32, keep_TK bool).
  """
  T, K = decision.expert_index_TK.shape
  S, E = group_size, num_experts
  G = T // S
  valid_GSK = decision.valid_TK().reshape(G, S, K)
  index_GSK = decision.expert_index_TK.reshape(G, S, K)
  if decision.priority_T is not None:
    order_GS = jnp.argsort(-decision.priority_T.reshape(G, S), axis=1, stable=True)
  else:
    order_GS = jnp.broadcast_to(jnp.arange(S), (G, S))
  take = lambda a: jnp.take_along_axis(a, order_GS[:, :, None], axis=1)
  onehot_GSKE = jax.nn.one_hot(take(index_GSK), E, dtype=jnp.int32) * take(valid_GSK)[..., None]
  # Rank k of every token comes before rank k+1 of any token.
  onehot_GKSE = onehot_GSKE.transpose(0, 2, 1, 3).reshape(G, K * S, E)
  position_GKSE = jnp.cumsum(onehot_GKSE, axis=1) - 1
  position_GSK = jnp.sum(position_GKSE * onehot_GKSE, axis=-1).reshape(G, K, S).transpose(0, 2, 1)
  # Undo the priority order.
  inverse_GS = jnp.argsort(order_GS, axis=1)
  position_GSK = jnp.take_along_axis(position_GSK, inverse_GS[:, :, None], axis=1)
  keep_GSK = valid_GSK & (position_GSK < capacity)
  return position_GSK.reshape(T, K).astype(jnp.int32), keep_GSK.reshape(T, K)


@DISPATCHERS.register("einsum", vma_clean=True, dropless=False)
def einsum_dispatch(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights,
                    capacity: CapacityOptions | None = None) -> tuple[jax.Array, Metrics]:
  """One-hot dispatch with per-group capacity (drops overflow)."""
  check_inputs(x_TD, decision, experts)
  opts = capacity or CapacityOptions()
  T, D = x_TD.shape
  K = decision.expert_index_TK.shape[1]
  E = experts.num_experts
  S = decision.group_size or resolve_group_size(T, opts.group_size)
  G = T // S
  C = decision.capacity or token_choice_capacity(S, K, E, opts.capacity_factor,
                                                 opts.min_capacity)
  position_TK, keep_TK = assign_capacity_slots(decision, E, S, C)
  dt = x_TD.dtype
  expert_GSKE = jax.nn.one_hot(decision.expert_index_TK, E, dtype=dt).reshape(G, S, K, E)
  slot_GSKC = jax.nn.one_hot(jnp.where(keep_TK, position_TK, C), C, dtype=dt).reshape(G, S, K, C)
  dispatch_GSEC = jnp.einsum("GSKE,GSKC->GSEC", expert_GSKE, slot_GSKC)
  weight_GSK = jnp.where(keep_TK, decision.weight_TK, 0.0).astype(dt).reshape(G, S, K)
  combine_GSEC = jnp.einsum("GSKE,GSKC,GSK->GSEC", expert_GSKE, slot_GSKC, weight_GSK)
  x_GSD = x_TD.reshape(G, S, D)
  x_EGCD = jnp.einsum("GSEC,GSD->EGCD", dispatch_GSEC, x_GSD)
  y_EXD = experts.batched(x_EGCD.reshape(E, G * C, D))
  y_GSD = jnp.einsum("GSEC,EGCD->GSD", combine_GSEC, y_EXD.reshape(E, G, C, D))
  valid = decision.valid_TK()
  dropped = 1.0 - keep_TK.sum() / jnp.maximum(valid.sum(), 1)
  return y_GSD.reshape(T, D), {"dropped_fraction": dropped.astype(jnp.float32),
                               "kept_TK": keep_TK}
