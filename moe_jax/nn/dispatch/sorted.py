"""Dropless dispatch: slots sorted by expert, one ragged grouped matmul (jax.lax.ragged_dot).

Axis letters: T tokens, D model dim, E experts, K slots per token, X = T*K slots.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.nn.dispatch.base import (DISPATCHERS, CapacityOptions, Metrics, check_inputs,
                                      zero_drops)
from moe_jax.nn.experts import ExpertWeights
from moe_jax.nn.routing import RoutingDecision


def sort_slots_by_expert(decision: RoutingDecision, num_experts: int):
  """Order of the T*K slots sorted by expert (unused slots last) and group sizes.

  Returns (order_X, group_sizes_E, valid_X) where X = T*K flattened slots, so
  slot order_X[i] is the i-th row in expert-sorted order and its token is
  order_X[i] // K.
  """
  valid_X = decision.valid_TK().reshape(-1)
  expert_X = jnp.where(valid_X, decision.expert_index_TK.reshape(-1), num_experts)
  order_X = jnp.argsort(expert_X, stable=True)
  group_sizes_E = jnp.bincount(expert_X, length=num_experts + 1)[:num_experts]
  return order_X, group_sizes_E.astype(jnp.int32), valid_X


@DISPATCHERS.register("sorted", vma_clean=True, dropless=True)
def sorted_dispatch(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights,
                    capacity: CapacityOptions | None = None) -> tuple[jax.Array, Metrics]:
  """Dropless: sort slots by expert, one ragged grouped matmul, unsort, combine."""
  del capacity  # dropless
  check_inputs(x_TD, decision, experts)
  K = decision.expert_index_TK.shape[1]
  order_X, group_sizes_E, valid_X = sort_slots_by_expert(decision, experts.num_experts)
  x_XD = jnp.take(x_TD, order_X // K, axis=0)
  y_XD = experts.ragged(x_XD, group_sizes_E)
  y_TD = unsort_combine(y_XD, order_X, valid_X, decision.weight_TK, K)
  return y_TD, zero_drops()


def unsort_combine(y_XD: jax.Array, order_X: jax.Array, valid_X: jax.Array,
                   weight_TK: jax.Array, K: int) -> jax.Array:
  """Rows in expert-sorted slot order -> [T, D]: weighted sum over each token's K slots.

  Unused slots were sorted past the last group: their rows are zeroed (unspecified).
  """
  X, D = y_XD.shape
  y_XD = jnp.where(jnp.take(valid_X, order_X)[:, None], y_XD, jnp.zeros((), y_XD.dtype))
  inverse_X = jnp.zeros_like(order_X).at[order_X].set(jnp.arange(X, dtype=order_X.dtype))
  y_TKD = jnp.take(y_XD, inverse_X, axis=0).reshape(X // K, K, D)
  w_TK = jnp.where(valid_X.reshape(-1, K), weight_TK, 0.0).astype(y_XD.dtype)
  return jnp.einsum("TKD,TK->TD", y_TKD, w_TK)
