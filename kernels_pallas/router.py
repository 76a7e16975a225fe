"""Fused top-k router as a Pallas kernel: f32 logits -> softmax -> top-k -> renormalise,
plus each slot's rank among the slots of its block that chose the same expert.

Axis letters: T tokens, E experts, K slots per token, B token blocks.

The router module keeps the x @ W matmul, jitter and aux losses in XLA (they need
the logits anyway); the kernel takes the f32 logits. Phase 1 (the kernel, one
program per block of `block_t` tokens): softmax, k rounds of "take the max, mask it" (ties -> lowest expert index), the
renormalised weights, per-block expert counts [B, E] and each slot's rank within its
block. Phase 2 (XLA, tiny): an exclusive cumsum of the block counts turns ranks into
each slot's position inside its expert group, in token-major slot order; these are
the positions a dropless permutation or a capacity check needs (tiling.py builds the
tile layout from them without a sort).

Gradients flow to the logits through the weights only (indices, positions and counts
are integers): the backward pass recomputes softmax and the renormalised gather in
plain JAX for the chosen indices.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.gmm import compiler_params, default_interpret, fit_block


def _router_kernel(logits_ref, index_ref, weight_ref, rank_ref, counts_ref, *, k: int,
                   renormalize: bool):
  # Triton-friendly: no slicing or concatenation of values (its lowering has neither);
  # the k columns are kept as [t, 1] values and merged into [t, k] with iota + where.
  logits = logits_ref[...].astype(jnp.float32)
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
  if renormalize:
    total = sum(weights)
    weights = [w / total for w in weights]
  ranks, counts = _ranks(indices, e)
  index_ref[...] = _columns(indices, jnp.int32)
  weight_ref[...] = _columns(weights, jnp.float32)
  rank_ref[...] = _columns(ranks, jnp.int32)
  counts_ref[...] = counts


def _columns(cols, dtype):
  """k values of shape [t, 1] -> one [t, k] value."""
  t, k = cols[0].shape[0], len(cols)
  slot_iota = jax.lax.broadcasted_iota(jnp.int32, (t, k), 1)
  out = jnp.zeros((t, k), dtype)
  for j, c in enumerate(cols):
    out = jnp.where(slot_iota == j, c.astype(dtype), out)
  return out


def _ranks(indices, num_experts: int):
  """Per slot: earlier slots (token-major) of this block with the same expert; block counts."""
  t, k = indices[0].shape[0], len(indices)
  expert_iota = jax.lax.broadcasted_iota(jnp.int32, (t, num_experts), 1)
  token_iota_r = jax.lax.broadcasted_iota(jnp.int32, (t, t), 0)
  token_iota_c = jax.lax.broadcasted_iota(jnp.int32, (t, t), 1)
  before = (token_iota_c < token_iota_r).astype(jnp.float32)  # strictly earlier tokens
  onehots = [(expert_iota == idx).astype(jnp.float32) for idx in indices]
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
  return ranks, counts.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("k", "renormalize", "block_t", "interpret"))
def _router_call(logits_TE, *, k: int, renormalize: bool, block_t: int, interpret: bool):
  T, E = logits_TE.shape
  B = T // block_t
  kernel = functools.partial(_router_kernel, k=k, renormalize=renormalize)
  index, weight, rank, counts = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((T, k), jnp.int32), jax.ShapeDtypeStruct((T, k), jnp.float32),
                 jax.ShapeDtypeStruct((T, k), jnp.int32),
                 # [B, 1, E]: a (1, E) block equals the array's last two dims (Mosaic's rule)
                 jax.ShapeDtypeStruct((B, 1, E), jnp.int32)),
      grid=(B,),
      in_specs=[pl.BlockSpec((block_t, E), lambda b: (b, 0))],
      out_specs=(pl.BlockSpec((block_t, k), lambda b: (b, 0)),
                 pl.BlockSpec((block_t, k), lambda b: (b, 0)),
                 pl.BlockSpec((block_t, k), lambda b: (b, 0)),
                 pl.BlockSpec((None, 1, E), lambda b: (b, 0, 0))),
      interpret=interpret,
      compiler_params=compiler_params(),
      name="moe_top_k_router",
  )(logits_TE)
  counts = counts.reshape(B, E)
  # Phase 2: block offsets (exclusive cumsum of counts) -> positions inside each group.
  offsets_BE = jnp.cumsum(counts, axis=0) - counts
  offset_TK = jnp.take_along_axis(jnp.repeat(offsets_BE, block_t, axis=0), index, axis=1)
  return index, weight, rank + offset_TK, counts.sum(0)


def chosen_weights(logits_TE: jax.Array, index_TK: jax.Array, renormalize: bool) -> jax.Array:
  """softmax(logits) at the chosen experts, renormalised: the differentiable part."""
  probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
  weight_TK = jnp.take_along_axis(probs_TE, index_TK, axis=1)
  return weight_TK / jnp.sum(weight_TK, axis=1, keepdims=True) if renormalize else weight_TK


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _fused(logits_TE, k, renormalize, block_t, interpret):
  return _router_call(logits_TE, k=k, renormalize=renormalize, block_t=block_t,
                      interpret=interpret)


def _fused_fwd(logits_TE, k, renormalize, block_t, interpret):
  out = _fused(logits_TE, k, renormalize, block_t, interpret)
  return out, (logits_TE, out[0])


def _fused_bwd(k, renormalize, block_t, interpret, res, cotangents):
  del k, block_t, interpret
  logits_TE, index_TK = res
  _, vjp = jax.vjp(lambda l: chosen_weights(l, index_TK, renormalize), logits_TE)
  return vjp(cotangents[1])


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_top_k_router(logits_TE: jax.Array, *, k: int, renormalize: bool = True,
                       block_t: int = 64, interpret: bool | None = None):
  """Returns (index_TK int32, weight_TK f32, position_TK int32, counts_E int32).

  position_TK is each slot's index inside its expert's group when slots are taken in
  token-major order (slot x = t * K + k); counts_E are the group sizes. Differentiable
  in logits_TE through weight_TK.
  """
  T, E = logits_TE.shape
  if not 1 <= k <= E:
    raise ValueError(f"k={k} must be in [1, E={E}]")
  block_t = fit_block(T, block_t)  # a divisor of T: blocks tile the tokens exactly
  return _fused(logits_TE.astype(jnp.float32), k, renormalize, block_t,
                default_interpret() if interpret is None else interpret)
