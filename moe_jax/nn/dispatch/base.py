"""Dispatchers: move tokens to experts and combine the results (registry: DISPATCHERS).

Axis letters: T tokens, D model dim, E experts, K slots per token,
G groups, S tokens per group, C capacity per expert and group.

Each dispatcher is a pure function
`fn(x_TD, decision, experts, capacity=None) -> (y_TD, metrics)`:
  - "einsum": one-hot dispatch/combine tensors with a fixed capacity per expert
    and group (static shapes; the TPU-friendly baseline). Slots past capacity are
    dropped in priority order; `metrics["dropped_fraction"]` reports the share and
    `metrics["kept_TK"]` which slots ran (dropless dispatchers run every valid slot).
  - "sorted": dropless. Slots are argsorted by expert, each expert's rows run as
    one ragged group (jax.lax.ragged_dot), then unsorted and combined.
  - "dense": every expert on every token, weighted; a reference, O(E) compute.
  - "pallas": dropless, kernels_pallas grouped matmul over a tile-padded layout
    (Pallas kernels on GPU/TPU, interpret mode on CPU).
  - "tiled": dropless, the same layout with per-tile gathered weights and one XLA
    batched matmul (no kernels; the fast dropless path on CPU).
  - "auto": the fastest dropless one for the platform (AUTO_DISPATCH).
With no slot over capacity, all give the numbers of a plain loop over experts.
A new dispatcher is one file in this package that registers itself with
`@DISPATCHERS.register(name, vma_clean=..., dropless=...)`: `vma_clean` says it is
plain JAX that jax.shard_map can type-check (expert_parallel.py), `dropless` that it
never drops a slot.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moe_jax import validation as V
from moe_jax.nn.experts import ExpertWeights
from moe_jax.nn.routing import RoutingDecision
from moe_jax.registry import Registry

Metrics = dict[str, jax.Array]
Dispatcher = Callable[..., tuple[jax.Array, Metrics]]
DISPATCHERS = Registry("dispatch", package="moe_jax.nn.dispatch")


@dataclasses.dataclass(frozen=True)
class CapacityOptions:
  """How capacity-limited dispatchers size their buffers (dropless ones ignore it)."""

  capacity_factor: float = 1.25
  group_size: int | None = None
  min_capacity: int = 1


def check_inputs(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights) -> None:
  V.check_rank("dispatch input x_TD", x_TD, 2, "tokens, model dim")
  if decision.num_tokens != x_TD.shape[0]:
    raise ValueError(f"routing decision covers T={decision.num_tokens} tokens but x_TD has "
                     f"T={x_TD.shape[0]}")
  if experts.d_model != x_TD.shape[1]:
    raise ValueError(f"x_TD has model dim D={x_TD.shape[1]} but the experts expect "
                     f"D={experts.d_model}")


def get_dispatcher(name: str) -> Dispatcher:
  """The dispatch function registered under `name`."""
  return DISPATCHERS.get(name)


def zero_drops() -> Metrics:
  return {"dropped_fraction": jnp.zeros((), jnp.float32)}
