"""Reference dispatch: every expert on every token, weighted (O(E) compute).

Axis letters: T tokens, D model dim, E experts.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.nn.dispatch.base import (DISPATCHERS, CapacityOptions, Metrics, check_inputs,
                                      zero_drops)
from moe_jax.nn.experts import ExpertWeights
from moe_jax.nn.routing import RoutingDecision


@DISPATCHERS.register("dense", vma_clean=True, dropless=True)
def dense_dispatch(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights,
                   capacity: CapacityOptions | None = None) -> tuple[jax.Array, Metrics]:
  """Reference: every expert on every token, combined by the routing weights."""
  del capacity
  check_inputs(x_TD, decision, experts)
  E = experts.num_experts
  y_ETD = experts.batched(jnp.broadcast_to(x_TD, (E,) + x_TD.shape))
  gates_TE = decision.gates_TE(E).astype(x_TD.dtype)
  return jnp.einsum("TE,ETD->TD", gates_TE, y_ETD), zero_drops()
