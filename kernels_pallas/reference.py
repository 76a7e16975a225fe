"""Plain-JAX references for the kernels (loops over experts; no Pallas)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def gmm_reference(lhs_RA, rhs_EAO, tile_expert_I, block_m: int, transpose_rhs: bool = False):
  """out[rows of tile i] = lhs[rows] @ rhs[tile_expert[i]] (zeros where tile_expert < 0)."""
  R = lhs_RA.shape[0]
  row_expert_R = jnp.repeat(tile_expert_I, block_m, total_repeat_length=R)
  out = None
  for e in range(rhs_EAO.shape[0]):
    w = rhs_EAO[e].T if transpose_rhs else rhs_EAO[e]
    y = jnp.dot(lhs_RA, w, preferred_element_type=jnp.float32)
    y = jnp.where((row_expert_R == e)[:, None], y, 0.0)
    out = y if out is None else out + y
  return out.astype(lhs_RA.dtype)


def tgmm_reference(lhs_RA, grad_RO, tile_expert_I, num_experts: int, block_m: int):
  """out[e] = lhs[rows of e]^T @ grad[rows of e]: the weight gradient, [E, K, N]."""
  R = lhs_RA.shape[0]
  row_expert_R = jnp.repeat(tile_expert_I, block_m, total_repeat_length=R)
  return jnp.stack([
      jnp.dot(jnp.where((row_expert_R == e)[:, None], lhs_RA, 0).T, grad_RO,
              preferred_element_type=jnp.float32) for e in range(num_experts)]).astype(lhs_RA.dtype)


def top_k_router_reference(logits_TE, k: int, renormalize: bool = True):
  """softmax(logits) -> top-k (ties: lowest index) -> weights; positions by a plain loop."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  probs = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
  weight, index = jax.lax.top_k(probs, k)
  if renormalize:
    weight = weight / weight.sum(-1, keepdims=True)
  idx = np.asarray(index)
  seen: dict[int, int] = {}
  position = np.zeros_like(idx)
  for t in range(idx.shape[0]):
    for j in range(k):
      e = int(idx[t, j])
      position[t, j] = seen.get(e, 0)
      seen[e] = seen.get(e, 0) + 1
  counts = np.bincount(idx.reshape(-1), minlength=logits_TE.shape[1])
  return index, weight, position, counts


def permute_reference(x_TD, layout, slots_per_token: int):
  """[T, D] -> [R, D]: each padded row gets its slot's token (zeros for padding)."""
  src = jnp.maximum(layout.row_slot_R, 0) // slots_per_token
  rows = jnp.take(x_TD, src, axis=0)
  return jnp.where((layout.row_slot_R >= 0)[:, None], rows, jnp.zeros((), x_TD.dtype))


def unpermute_reference(y_RD, layout):
  """[R, D] -> [X, D]: each slot's row (zeros for unused slots)."""
  used = layout.slot_row_X < layout.num_rows
  rows = jnp.take(y_RD, jnp.minimum(layout.slot_row_X, layout.num_rows - 1), axis=0)
  return jnp.where(used[:, None], rows, jnp.zeros((), y_RD.dtype))


def combine_reference(y_RD, layout, weight_TK):
  """[R, D] -> [T, D]: y[t] = sum_k weight[t, k] * y_R[row of slot (t, k)] (a take per slot)."""
  T, K = weight_TK.shape
  y_TKD = unpermute_reference(y_RD, layout).reshape(T, K, -1)
  return jnp.einsum("TKD,TK->TD", y_TKD, weight_TK.astype(y_RD.dtype))
