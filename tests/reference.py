"""Plain references the tests compare against: loops over experts and tokens.

Written independently of moe_jax's dispatchers: numpy float64 loops for values,
and a jnp loop over experts (differentiable) for gradients.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def np_ffn(x_XD, w_up_DF, w_down_FD, w_gate_DF=None):
  """One expert in float64 numpy: SwiGLU when w_gate is given, else GELU (tanh form)."""
  up = x_XD @ w_up_DF
  if w_gate_DF is not None:
    gate = x_XD @ w_gate_DF
    h = gate / (1.0 + np.exp(-gate)) * up
  else:
    h = 0.5 * up * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (up + 0.044715 * up**3)))
  return h @ w_down_FD


def np_moe(x_TD, index_TK, weight_TK, keep_TK, experts):
  """y[t] = sum over kept slots k of weight[t,k] * expert_{index[t,k]}(x[t]); float64 loops."""
  f64 = lambda a: None if a is None else np.asarray(a, np.float64)
  x = f64(x_TD)
  w_up, w_down, w_gate = f64(experts.w_up_EDF), f64(experts.w_down_EFD), f64(experts.w_gate_EDF)
  index, weight, keep = np.asarray(index_TK), f64(weight_TK), np.asarray(keep_TK)
  y = np.zeros_like(x)
  for e in range(w_up.shape[0]):
    for t, k in zip(*np.nonzero((index == e) & keep)):
      y[t] += weight[t, k] * np_ffn(x[t:t + 1], w_up[e], w_down[e],
                                    None if w_gate is None else w_gate[e])[0]
  return y


def np_capacity_keep(index_TK, valid_TK, group_size, capacity, priority_T=None):
  """Which slots fit: per group, rank-0 slots first, tokens in priority order."""
  index, valid = np.asarray(index_TK), np.asarray(valid_TK)
  T, K = index.shape
  keep = np.zeros((T, K), bool)
  for g0 in range(0, T, group_size):
    tokens = list(range(g0, g0 + group_size))
    if priority_T is not None:
      p = np.asarray(priority_T)
      tokens.sort(key=lambda t: -p[t])  # stable: ties keep token order
    used = {}
    for k in range(K):
      for t in tokens:
        if valid[t, k]:
          e = index[t, k]
          if used.get(e, 0) < capacity:
            keep[t, k] = True
          used[e] = used.get(e, 0) + 1
  return keep


def jnp_loop_moe(x_TD, index_TK, weight_TK, keep_TK, experts):
  """Differentiable loop over experts (each expert on all tokens, masked)."""
  y = jnp.zeros(x_TD.shape, jnp.float32)
  for e in range(experts.num_experts):
    up = x_TD @ experts.w_up_EDF[e]
    if experts.w_gate_EDF is not None:
      h = jax.nn.silu(x_TD @ experts.w_gate_EDF[e]) * up
    else:
      h = jax.nn.gelu(up)
    out = (h @ experts.w_down_EFD[e]).astype(jnp.float32)
    gate_T = jnp.sum(jnp.where((index_TK == e) & keep_TK, weight_TK, 0.0), axis=1)
    y = y + gate_T[:, None] * out
  return y


def np_attention(x_BSD, w_qkv_D3HQ, w_out_HQD, mask_BS=None):
  """Multi-head softmax(q k^T / sqrt(Q)) v in float64; padded keys (mask False) get no weight."""
  x, w_qkv, w_out = (np.asarray(a, np.float64) for a in (x_BSD, w_qkv_D3HQ, w_out_HQD))
  q, k, v = (np.einsum("BSD,DHQ->BHSQ", x, w_qkv[:, j]) for j in range(3))
  scores = np.einsum("BHSQ,BHTQ->BHST", q, k) / np.sqrt(q.shape[-1])
  if mask_BS is not None:
    scores = np.where(np.asarray(mask_BS, bool)[:, None, None, :], scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("BHST,BHTQ,HQD->BSD", p, v, w_out)


def np_rms_norm(x, scale, eps):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * np.asarray(scale, np.float64)


def np_top_k_routing(x_TD, w_DE, k, renormalize=True):
  """Softmax over experts, the k largest (ties to the lower index), optionally renormalised."""
  logits = np.asarray(x_TD, np.float64) @ np.asarray(w_DE, np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  index = np.argsort(-p, axis=-1, kind="stable")[:, :k]
  weight = np.take_along_axis(p, index, -1)
  if renormalize:
    weight = weight / weight.sum(-1, keepdims=True)
  return index, weight
