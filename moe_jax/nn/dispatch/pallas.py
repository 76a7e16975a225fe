"""Dropless dispatch with the kernels_pallas kernels over a tile-padded layout.

Axis letters: T tokens, D model dim, E experts.
"""
from __future__ import annotations

import functools

import jax

from moe_jax.nn.dispatch.base import DISPATCHERS, CapacityOptions, Metrics
from moe_jax.nn.dispatch.tiles import TileOps, tile_block_m, tile_padded_ffn
from moe_jax.nn.experts import ExpertWeights
from moe_jax.nn.routing import RoutingDecision


def pallas_tile_ops(platform: str) -> TileOps:
  """The kernels_pallas ops for a platform. GPU (and CPU, in interpret mode): Triton-style
  kernels incl. the permute/combine gathers and the fused SwiGLU gmm. TPU: the Mosaic
  grouped matmul (scalar-prefetched tile->expert map) with XLA gathers for permute and
  combine (row gathers by a vector of indices do not map onto Mosaic blocks)."""
  # pylint: disable=import-outside-toplevel
  from kernels_pallas import gmm, gmm_tpu, permute, swiglu
  if platform == "tpu":
    return TileOps(gmm_tpu.grouped_matmul_tpu,
                   functools.partial(permute.permute_tokens, xla=True),
                   functools.partial(permute.unpermute_combine, xla=True))
  return TileOps(gmm.grouped_matmul, permute.permute_tokens, permute.unpermute_combine,
                 swiglu.grouped_swiglu)


@DISPATCHERS.register("pallas", vma_clean=False, dropless=True)
def pallas_dispatch(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights,
                    capacity: CapacityOptions | None = None,
                    block_m: int | None = None) -> tuple[jax.Array, Metrics]:
  """Dropless with the kernels_pallas kernels: permute, grouped matmul (with the fused
  SwiGLU epilogue on GPU), unpermute+combine. Interpret mode on CPU: correct but slow."""
  del capacity  # dropless
  platform = jax.default_backend()
  block_m = block_m or tile_block_m(decision.expert_index_TK.size, experts.num_experts,
                                    platform != "cpu")
  return tile_padded_ffn(x_TD, decision, experts, pallas_tile_ops(platform), block_m)
