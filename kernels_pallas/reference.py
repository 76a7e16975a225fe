"""Plain-JAX references for the kernels (loops over experts; no Pallas)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def gmm_reference(lhs_RK, rhs_EKN, tile_expert_I, block_m: int, transpose_rhs: bool = False):
  """out[rows of tile i] = lhs[rows] @ rhs[tile_expert[i]] (zeros where tile_expert < 0)."""
  R = lhs_RK.shape[0]
  row_expert_R = jnp.repeat(tile_expert_I, block_m, total_repeat_length=R)
  out = None
  for e in range(rhs_EKN.shape[0]):
    w = rhs_EKN[e].T if transpose_rhs else rhs_EKN[e]
    y = jnp.dot(lhs_RK, w, preferred_element_type=jnp.float32)
    y = jnp.where((row_expert_R == e)[:, None], y, 0.0)
    out = y if out is None else out + y
  return out.astype(lhs_RK.dtype)


def tgmm_reference(lhs_RK, grad_RN, tile_expert_I, num_experts: int, block_m: int):
  """out[e] = lhs[rows of e]^T @ grad[rows of e]: the weight gradient, [E, K, N]."""
  R = lhs_RK.shape[0]
  row_expert_R = jnp.repeat(tile_expert_I, block_m, total_repeat_length=R)
  return jnp.stack([
      jnp.dot(jnp.where((row_expert_R == e)[:, None], lhs_RK, 0).T, grad_RN,
              preferred_element_type=jnp.float32) for e in range(num_experts)]).astype(lhs_RK.dtype)


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
