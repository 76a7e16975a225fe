"""Modality tokenizers: raw inputs -> [B, N, D] tokens with per-axis position embeddings.

Axis letters: B batch, S tokens per example, D model dim, P patch features.

Positions are embedded per axis (row, column, time, frequency) and summed, so
a tokenizer accepts any resolution up to `max_positions` per axis, and tokens
keep their position when DropToken removes some of them.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def patchify(x: jax.Array, patch: tuple[int, ...]) -> tuple[jax.Array, tuple[int, ...]]:
  """[B, *grid_axes, C] -> [B, N, prod(patch) * C] and the token grid shape."""
  B, *axes, C = x.shape
  if len(axes) != len(patch):
    raise ValueError(f"input with {len(axes)} spatial axes {tuple(axes)} needs a patch of "
                     f"{len(axes)} sizes, got patch={patch}")
  for a, p in zip(axes, patch):
    if a % p:
      raise ValueError(f"input shape {tuple(x.shape)} is not divisible by patch={patch}")
  grid = tuple(a // p for a, p in zip(axes, patch))
  split = [B]
  for g, p in zip(grid, patch):
    split += [g, p]
  x = x.reshape(*split, C)
  n = len(patch)
  # [B, g0, p0, g1, p1, ..., C] -> [B, g0, g1, ..., p0, p1, ..., C]
  order = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [1 + 2 * n]
  x = x.transpose(order)
  num_tokens = 1
  for g in grid:
    num_tokens *= g
  return x.reshape(B, num_tokens, -1), grid


class PatchTokenizer(nn.Module):
  """Images [B,H,W,C], video [B,T,H,W,C] or spectrograms [B,T,F] -> tokens [B, N, D]."""

  patch: tuple[int, ...]
  d_model: int
  max_positions: int = 64
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim == len(self.patch) + 1:  # no channel axis (spectrograms)
      x = x[..., None]
    tokens_BSP, grid = patchify(x.astype(jnp.float32), self.patch)
    if max(grid) > self.max_positions:
      raise ValueError(f"token grid {grid} exceeds max_positions={self.max_positions}")
    tokens_BSD = nn.Dense(self.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="input_projection")(tokens_BSP)
    pos_SD = jnp.zeros((1,) * len(grid) + (self.d_model,), jnp.float32)
    for axis, g in enumerate(grid):
      table = self.param(f"position_axis{axis}", nn.initializers.normal(0.02),
                         (self.max_positions, self.d_model), self.param_dtype)
      shape = [1] * len(grid) + [self.d_model]
      shape[axis] = g
      pos_SD = pos_SD + table[:g].reshape(shape)
    return tokens_BSD + pos_SD.reshape(1, -1, self.d_model).astype(tokens_BSD.dtype)


class TextTokenizer(nn.Module):
  """Token ids [B, L] (0 = padding) -> embeddings [B, L, D] and a mask [B, L]."""

  vocab_size: int
  d_model: int
  max_positions: int = 256
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids_BS: jax.Array) -> tuple[jax.Array, jax.Array]:
    L = ids_BS.shape[1]
    if L > self.max_positions:
      raise ValueError(f"text length {L} exceeds max_positions={self.max_positions}")
    emb = nn.Embed(self.vocab_size, self.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="embedding")(ids_BS)
    pos = self.param("position", nn.initializers.normal(0.02), (self.max_positions, self.d_model),
                     self.param_dtype)
    return emb + pos[None, :L].astype(emb.dtype), ids_BS != 0


def drop_tokens(rng: jax.Array, tokens_BSD: jax.Array, mask_BS: jax.Array | None,
                drop_rate: float) -> tuple[jax.Array, jax.Array | None]:
  """DropToken: keep a random subset of round((1 - rate) * N) tokens per example.

  The count rounds to the nearest integer, halves up, and is at least 1 (N=10:
  rate 0.33 keeps 7, rate 0.37 keeps 6, rate 0.25 keeps 8). Positions were added
  before dropping, so the kept tokens still know where they came from; the kept
  ones stay in their original order.
  """
  B, N, _ = tokens_BSD.shape
  keep = max(1, math.floor((1.0 - drop_rate) * N + 0.5))
  if keep >= N:
    return tokens_BSD, mask_BS
  scores_BS = jax.random.uniform(rng, (B, N))
  _, idx_BS = jax.lax.top_k(scores_BS, keep)
  idx_BS = jnp.sort(idx_BS, axis=1)
  tokens = jnp.take_along_axis(tokens_BSD, idx_BS[:, :, None], axis=1)
  mask = None if mask_BS is None else jnp.take_along_axis(mask_BS, idx_BS, axis=1)
  return tokens, mask
