"""Dropless dispatch in plain XLA over the tile-padded layout (no Pallas, no ragged_dot).

Axis letters: T tokens, D model dim, E experts.
"""
from __future__ import annotations

import functools

import jax

from moe_jax.nn.dispatch.base import DISPATCHERS, CapacityOptions, Metrics
from moe_jax.nn.dispatch.tiles import TileOps, tile_block_m, tile_padded_ffn
from moe_jax.nn.experts import ExpertWeights
from moe_jax.nn.routing import RoutingDecision


@DISPATCHERS.register("tiled", vma_clean=True, dropless=True)
def tiled_dispatch(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights,
                   capacity: CapacityOptions | None = None,
                   block_m: int | None = None) -> tuple[jax.Array, Metrics]:
  """Dropless in plain XLA over the same tile-padded layout (no Pallas, no ragged_dot).

  On CPU the expert FFN is one while loop over the used tiles (f32 dots, weights read in
  place: kernels_pallas/tile_loop.py); elsewhere each tile's weights are gathered and
  one batched matmul runs (tile_gather.py). Permute and combine are gathers both ways.
  """
  del capacity  # dropless
  # pylint: disable=import-outside-toplevel
  from kernels_pallas import permute, tile_gather, tile_loop
  cpu = jax.default_backend() == "cpu"
  block_m = block_m or tile_block_m(decision.expert_index_TK.size, experts.num_experts, not cpu)
  gathers = dict(permute=functools.partial(permute.permute_tokens, xla=True),
                 combine=functools.partial(permute.unpermute_combine, xla=True))
  if cpu:
    ops = TileOps(tile_loop.tile_loop_matmul, swiglu_ffn=tile_loop.tile_loop_swiglu_ffn, **gathers)
  else:
    ops = TileOps(tile_gather.tile_gather_matmul, **gathers)
  return tile_padded_ffn(x_TD, decision, experts, ops, block_m)
