"""Dropless dispatch in plain XLA over the tile-padded layout (no Pallas, no ragged_dot).

Axis letters: T tokens, D model dim, E experts.
"""
from __future__ import annotations

import functools
import logging

import jax

from moe_jax.nn.dispatch.base import DISPATCHERS, CapacityOptions, Metrics
from moe_jax.nn.dispatch.tiles import TileOps, tile_block_m, tile_padded_ffn
from moe_jax.nn.experts import ExpertWeights
from moe_jax.nn.routing import RoutingDecision


# The native kernels work per expert, not per tile: the row tile only sets the padding
# (at most block_m - 1 rows per expert). Layer fwd+bwd by block_m 4/8/16/32/64, ms
# (2026-12-01, kernels_pallas/NOTES.md): cpu_olmoe 36/38/47/49/54, cpu_qwen3
# 36/36/38/49/58, cpu_mixtral 45/45/47/52/53. 8 keeps the layout's tile arrays small.
NATIVE_BLOCK_M = 8


def native_cpu_kernels(*arrays) -> bool:
  """Whether the kernels_cpu grouped matmuls serve this call: built and registered, and
  none of `arrays` (the tokens, the routing decision, the expert weights) varies over a
  jax.shard_map axis: an FFI call there does not carry the varying-axes type the tile
  loop keeps (with expert parallelism the tokens may be replicated while the weights
  vary). Says once, on the log, why not when they cannot be built."""
  from kernels_cpu import build  # pylint: disable=import-outside-toplevel
  why = build.unavailable()
  if why is not None:
    _say_once(f"tiled dispatch on CPU: native kernels unavailable ({why}); using the XLA tile loop")
    return False
  return not any(_varying(a) for a in jax.tree.leaves(arrays))


def _varying(a) -> bool:
  return bool(getattr(getattr(jax.typeof(a), "manual_axis_type", None), "varying", None))


@functools.cache
def _say_once(message: str) -> None:
  logging.warning(message)


@DISPATCHERS.register("tiled", vma_clean=True, dropless=True)
def tiled_dispatch(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights,
                   capacity: CapacityOptions | None = None,
                   block_m: int | None = None) -> tuple[jax.Array, Metrics]:
  """Dropless in plain XLA over the same tile-padded layout (no Pallas, no ragged_dot).

  On CPU the grouped matmuls are native kernels spread over XLA's threads
  (kernels_cpu, built on first use) or, without a C++ compiler or inside shard_map, one
  XLA while loop over the used tiles (kernels_pallas/tile_loop.py); elsewhere each tile's
  weights are gathered and one batched matmul runs (tile_gather.py). Permute and combine
  are gathers both ways.
  """
  del capacity  # dropless
  # pylint: disable=import-outside-toplevel
  from kernels_pallas import permute, tile_gather, tile_loop
  cpu = jax.default_backend() == "cpu"
  native = cpu and native_cpu_kernels(x_TD, decision, experts)
  block_m = block_m or (NATIVE_BLOCK_M if native else tile_block_m(
      decision.expert_index_TK.size, experts.num_experts, not cpu))
  gathers = dict(permute=functools.partial(permute.permute_tokens, xla=True),
                 combine=functools.partial(permute.unpermute_combine, xla=True))
  if native:
    from kernels_cpu import tile_matmul  # pylint: disable=import-outside-toplevel
    ops = TileOps(tile_matmul.tile_matmul, swiglu_ffn=tile_matmul.tile_swiglu_ffn, **gathers)
  elif cpu:
    ops = TileOps(tile_loop.tile_loop_matmul, swiglu_ffn=tile_loop.tile_loop_swiglu_ffn, **gathers)
  else:
    ops = TileOps(tile_gather.tile_gather_matmul, **gathers)
  return tile_padded_ffn(x_TD, decision, experts, ops, block_m)
