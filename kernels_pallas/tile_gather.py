"""Grouped matmul over the tile-padded layout in plain XLA: gather each tile's expert
weights, then one batched matmul. No Pallas, so it runs fast on CPU; on accelerators
the weight gather (one [A, O] copy per row tile) is what the Pallas kernel avoids.

Axis letters: R padded rows, I row tiles, M rows per tile, A contraction, O output.
Differentiable by plain autodiff (the weight gradient is a scatter-add over tiles).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.tiling import TileLayout


def tile_gather_matmul(lhs_RA: jax.Array, rhs_EAO: jax.Array, layout: TileLayout) -> jax.Array:
  """out[R, O] = lhs[R, A] @ rhs[expert of row's tile]; zeros on tiles past the last expert."""
  tile_expert_I = layout.tile_expert_I
  I, M = tile_expert_I.shape[0], layout.block_m
  w_IAO = jnp.take(rhs_EAO, jnp.maximum(tile_expert_I, 0), axis=0)
  y_IMN = jnp.einsum("IMK,IKN->IMN", lhs_RA.reshape(I, M, -1), w_IAO,
                     preferred_element_type=jnp.float32)
  y_IMN = jnp.where((tile_expert_I >= 0)[:, None, None], y_IMN, 0.0)
  return y_IMN.reshape(I * M, -1).astype(lhs_RA.dtype)
