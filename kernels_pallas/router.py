"""Fused top-k router as a Pallas kernel: x @ W (f32) -> softmax -> top-k -> renormalise,
plus each slot's rank among the slots of its block that chose the same expert.

Axis letters: T tokens, D model dim, E experts, K slots per token, B token blocks.

Phase 1 (the kernel, one program per block of `block_t` tokens): logits in f32,
softmax, k rounds of "take the max, mask it" (ties -> lowest expert index), the
renormalised weights, per-block expert counts [B, E] and each slot's rank within its
block. Phase 2 (XLA, tiny): an exclusive cumsum of the block counts turns ranks into
each slot's position inside its expert group, in token-major slot order; these are
the positions a dropless permutation or a capacity check needs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.gmm import default_interpret


def _router_kernel(x_ref, w_ref, index_ref, weight_ref, rank_ref, counts_ref, *, k: int,
                   renormalize: bool):
  x = x_ref[...].astype(jnp.float32)
  logits = jax.lax.dot_general(x, w_ref[...].astype(jnp.float32), (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
  t, e = logits.shape
  probs = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
  probs = probs / jnp.sum(probs, axis=1, keepdims=True)
  expert_iota = jax.lax.broadcasted_iota(jnp.int32, (t, e), 1)
  remaining = probs
  indices, weights = [], []
  for _ in range(k):
    best = jnp.max(remaining, axis=1, keepdims=True)
    idx = jnp.min(jnp.where(remaining == best, expert_iota, e), axis=1, keepdims=True)
    indices.append(idx)
    weights.append(best)
    remaining = jnp.where(expert_iota == idx, -1.0, remaining)
  index_TK = jnp.concatenate(indices, axis=1)
  weight_TK = jnp.concatenate(weights, axis=1)
  if renormalize:
    weight_TK = weight_TK / jnp.sum(weight_TK, axis=1, keepdims=True)
  ranks, counts = _ranks(index_TK, e)
  index_ref[...] = index_TK
  weight_ref[...] = weight_TK
  rank_ref[...] = ranks
  counts_ref[...] = counts


def _ranks(index_TK, num_experts: int):
  """Per slot: earlier slots (token-major) of this block with the same expert; block counts."""
  t, k = index_TK.shape
  expert_iota = jax.lax.broadcasted_iota(jnp.int32, (t, num_experts), 1)
  token_iota_r = jax.lax.broadcasted_iota(jnp.int32, (t, t), 0)
  token_iota_c = jax.lax.broadcasted_iota(jnp.int32, (t, t), 1)
  before = (token_iota_c < token_iota_r).astype(jnp.float32)  # strictly earlier tokens
  onehots = [(expert_iota == index_TK[:, j:j + 1]).astype(jnp.float32) for j in range(k)]
  all_slots = sum(onehots)  # [t, E]: slots of each token per expert (0 or 1 each)
  earlier_tokens = jax.lax.dot_general(before, all_slots, (((1,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32)  # [t, E]
  ranks = []
  same_token_earlier = jnp.zeros_like(all_slots)
  for j in range(k):
    r = jnp.sum((earlier_tokens + same_token_earlier) * onehots[j], axis=1, keepdims=True)
    ranks.append(r)
    same_token_earlier = same_token_earlier + onehots[j]
  counts = jnp.sum(all_slots, axis=0, keepdims=True)  # [1, E]
  return jnp.concatenate(ranks, axis=1).astype(jnp.int32), counts.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("k", "renormalize", "block_t", "interpret"))
def fused_top_k_router(x_TD: jax.Array, w_DE: jax.Array, *, k: int, renormalize: bool = True,
                       block_t: int = 64, interpret: bool | None = None):
  """Returns (index_TK int32, weight_TK f32, position_TK int32, counts_E int32).

  position_TK is each slot's index inside its expert's group when slots are taken in
  token-major order (slot x = t * K + k); counts_E are the group sizes.
  """
  T, D = x_TD.shape
  E = w_DE.shape[1]
  if interpret is None:
    interpret = default_interpret()
  block_t = min(block_t, T)
  if T % block_t:
    raise ValueError(f"tokens T={T} must be a multiple of block_t={block_t}")
  B = T // block_t
  kernel = functools.partial(_router_kernel, k=k, renormalize=renormalize)
  index, weight, rank, counts = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((T, k), jnp.int32), jax.ShapeDtypeStruct((T, k), jnp.float32),
                 jax.ShapeDtypeStruct((T, k), jnp.int32), jax.ShapeDtypeStruct((B, E), jnp.int32)),
      grid=(B,),
      in_specs=[pl.BlockSpec((block_t, D), lambda b: (b, 0)), pl.BlockSpec((D, E), lambda b: (0, 0))],
      out_specs=(pl.BlockSpec((block_t, k), lambda b: (b, 0)),
                 pl.BlockSpec((block_t, k), lambda b: (b, 0)),
                 pl.BlockSpec((block_t, k), lambda b: (b, 0)),
                 pl.BlockSpec((1, E), lambda b: (b, 0))),
      interpret=interpret,
      name="moe_top_k_router",
  )(x_TD, w_DE)
  # Phase 2: block offsets (exclusive cumsum of counts) -> positions inside each group.
  offsets_BE = jnp.cumsum(counts, axis=0) - counts
  offset_TK = jnp.take_along_axis(jnp.repeat(offsets_BE, block_t, axis=0), index, axis=1)
  return index, weight, rank + offset_TK, counts.sum(0)
