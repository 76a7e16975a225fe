"""`auto`: the fastest dropless dispatcher measured on each platform.

Axis letters: T tokens, D model dim.
"""
from __future__ import annotations

import jax

from moe_jax.nn.dispatch.base import DISPATCHERS, CapacityOptions, Metrics
from moe_jax.nn.experts import ExpertWeights
from moe_jax.nn.routing import RoutingDecision

# Dropless path `auto` takes per platform (docs/performance.md). cpu: measured, tiled is
# the fastest dropless path there. gpu: tiled until the Pallas kernels are measured; the
# same tile-gather algorithm beat XLA's ragged_dot at every shape of the H200 anchors.
# tpu: not measured; ragged_dot lowers to a native grouped matmul.
AUTO_DISPATCH = {"cpu": "tiled", "gpu": "tiled", "tpu": "sorted"}


@DISPATCHERS.register("auto", vma_clean=False, dropless=True)
def auto_dispatch(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights,
                  capacity: CapacityOptions | None = None) -> tuple[jax.Array, Metrics]:
  """The fastest dropless dispatcher for this platform (AUTO_DISPATCH)."""
  name = AUTO_DISPATCH.get(jax.default_backend(), "sorted")
  return DISPATCHERS.get(name)(x_TD, decision, experts, capacity)
