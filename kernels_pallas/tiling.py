"""Tile-padded expert layout: slots sorted by expert, each expert's rows padded to a
multiple of the row tile, so every row tile of the grouped matmul belongs to ONE expert.

Axis letters: T tokens, K slots per token, X = T*K slots, E experts, R padded rows,
I row tiles, D model dim.

The layout is index arithmetic in plain JAX (argsort, bincount, cumsum; or, from the
fused router's in-group positions, cumsum and a scatter without any sort). Moving the
rows is permute.py (gathers both ways); plain-JAX references are in reference.py.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TileLayout:
  """Where each slot's row lives in the padded, expert-sorted buffer.

  row_slot_R: slot held by each padded row, -1 for padding rows.
  slot_row_X: padded row of each slot, R (out of range) for unused slots.
  tile_expert_I: expert of each row tile, -1 for tiles past the last expert.
  tile_start_E, tile_end_E: each expert's row-tile range [start, end).
  block_m: rows per tile (static).
  """

  row_slot_R: jax.Array
  slot_row_X: jax.Array
  tile_expert_I: jax.Array
  tile_start_E: jax.Array
  tile_end_E: jax.Array
  block_m: int = flax.struct.field(pytree_node=False, default=128)

  @property
  def num_rows(self) -> int:
    return self.row_slot_R.shape[0]

  def zero_cotangent(self) -> "TileLayout":
    """The layout's cotangent in a custom_vjp: integer index arrays have float0 gradients."""
    return jax.tree.map(lambda a: jnp.zeros(a.shape, jax.dtypes.float0), self)


def padded_rows(num_slots: int, num_experts: int, block_m: int) -> int:
  """Static buffer size: every slot plus at most block_m - 1 padding rows per expert."""
  rows = num_slots + num_experts * (block_m - 1)
  return max(block_m, -(-rows // block_m) * block_m)


def make_tile_layout(expert_X: jax.Array, valid_X: jax.Array, num_experts: int,
                     block_m: int) -> TileLayout:
  """Layout by sorting: one stable argsort of the slots by expert gives each slot's rank."""
  X, E = expert_X.shape[0], num_experts
  key_X = jnp.where(valid_X, expert_X, E).astype(jnp.int32)
  counts_E = jnp.bincount(key_X, length=E + 1)[:E].astype(jnp.int32)
  order_X = jnp.argsort(key_X, stable=True)
  sorted_key = key_X[order_X]
  first_E = jnp.cumsum(counts_E) - counts_E  # first sorted position of each expert
  rank_sorted = jnp.arange(X, dtype=jnp.int32) - first_E[jnp.minimum(sorted_key, E - 1)]
  rank_X = jnp.zeros((X,), jnp.int32).at[order_X].set(rank_sorted)
  return layout_from_ranks(key_X, rank_X, counts_E, block_m)


def layout_from_ranks(expert_X: jax.Array, rank_X: jax.Array, counts_E: jax.Array,
                      block_m: int) -> TileLayout:
  """Layout from each slot's rank inside its expert group (no sort needed).

  expert_X >= E marks unused slots. The fused router kernel returns these ranks
  (its `position_TK`) and the counts directly, so the dispatcher skips the argsort.
  """
  X, E = expert_X.shape[0], counts_E.shape[0]
  R = padded_rows(X, E, block_m)
  used_X = (expert_X >= 0) & (expert_X < E)
  e_X = jnp.clip(expert_X, 0, E - 1)
  padded_E = (counts_E + block_m - 1) // block_m * block_m
  start_E = (jnp.cumsum(padded_E) - padded_E).astype(jnp.int32)  # first row of each expert
  slot_row_X = jnp.where(used_X, start_E[e_X] + rank_X, R).astype(jnp.int32)
  row_slot_R = jnp.full((R,), -1, jnp.int32).at[slot_row_X].set(
      jnp.arange(X, dtype=jnp.int32), mode="drop")
  tile_start_E = (start_E // block_m).astype(jnp.int32)
  tile_end_E = ((start_E + padded_E) // block_m).astype(jnp.int32)
  tiles = jnp.arange(R // block_m, dtype=jnp.int32)
  # The expert of tile i is the first whose tile range ends after i.
  owner_I = jnp.sum(tile_end_E[None, :] <= tiles[:, None], axis=1).astype(jnp.int32)
  tile_expert_I = jnp.where(owner_I < E, owner_I, -1)
  return TileLayout(row_slot_R, slot_row_X, tile_expert_I, tile_start_E, tile_end_E, block_m)
