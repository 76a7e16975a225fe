"""Multi-head self-attention with optional rotary position embeddings (RoPE).

Axis letters: B batch, S sequence, D model dim. H heads, Q features per
head (K is taken by "experts per token"), Z the q/k/v index (`3` in w_qkv_D3HQ),
Y key/value heads, L slots of the KV cache (decoding).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def apply_rope(x_BSHQ: jax.Array, positions_BS: jax.Array,
               max_wavelength: float = 10_000.0) -> jax.Array:
  """Rotates pairs (first half, second half) of each head's features by position."""
  half = x_BSHQ.shape[-1] // 2
  freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BSQ = positions_BS[..., None].astype(jnp.float32) * freq[None, None, :]
  sin, cos = jnp.sin(angle_BSQ)[:, :, None, :], jnp.cos(angle_BSQ)[:, :, None, :]
  x1, x2 = jnp.split(x_BSHQ.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BSHQ.dtype)


def attend_with_cache(module: nn.Module, q_BSHQ, k_BSYQ, v_BSYQ, mask_BS,
                      window: int | None = None) -> jax.Array:
  """Causal attention of S new tokens over every cached slot, after writing theirs.

  The cache lives in `module`'s "cache" collection (preallocated by the first,
  max-length call that creates it; see moe_jax/inference/cache.py): L slots of keys and
  values, which slots hold a real token, and the next free slot. A new token at slot i
  sees the real slots <= i (and > i - window with a sliding window: a row's real
  tokens fill consecutive slots, so slot distance is token distance)."""
  creating = not module.has_variable("cache", "key_BLYQ")
  key = module.variable("cache", "key_BLYQ", jnp.zeros, k_BSYQ.shape, k_BSYQ.dtype)
  value = module.variable("cache", "value_BLYQ", jnp.zeros, v_BSYQ.shape, v_BSYQ.dtype)
  real = module.variable("cache", "real_BL", jnp.zeros, k_BSYQ.shape[:2], jnp.bool_)
  index = module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
  B, S = q_BSHQ.shape[:2]
  if creating:  # shapes only: this call's output is not used
    return jnp.zeros(q_BSHQ.shape[:3] + v_BSYQ.shape[3:], q_BSHQ.dtype)
  i, L = index.value, key.value.shape[1]
  key.value = jax.lax.dynamic_update_slice(key.value, k_BSYQ.astype(key.value.dtype),
                                           (0, i, 0, 0))
  value.value = jax.lax.dynamic_update_slice(value.value, v_BSYQ.astype(value.value.dtype),
                                             (0, i, 0, 0))
  new_real = jnp.ones((B, S), jnp.bool_) if mask_BS is None else mask_BS.astype(bool)
  real.value = jax.lax.dynamic_update_slice(real.value, new_real, (0, i))
  index.value = i + S
  slot_S = i + jnp.arange(S)
  visible_BSL = real.value[:, None, :] & (jnp.arange(L)[None, None, :] <= slot_S[None, :, None])
  if window is not None:
    visible_BSL &= jnp.arange(L)[None, None, :] > slot_S[None, :, None] - window
  return jax.nn.dot_product_attention(q_BSHQ, key.value, value.value,
                                      mask=visible_BSL[:, None, :, :])


class SelfAttention(nn.Module):
  """Multi-head self-attention; causal for decoders, key-padding mask optional.

  One fused q/k/v projection (w_qkv_D3HQ) by default. Grouped-query attention
  (`num_kv_heads` Y < H, as Mixtral / Qwen3-MoE), q/k/v biases (Qwen2) or q/k RMSNorm
  (`qk_norm`: "head" normalises each head's Q features as Qwen3 does, "full" all heads'
  features at once as OLMoE does) use separate projections w_q_DHQ, w_k_DYQ, w_v_DYQ.
  """

  num_heads: int
  head_dim: int
  causal: bool = False
  rope: bool = False
  rope_max_wavelength: float = 10_000.0
  num_kv_heads: int | None = None
  qkv_bias: bool = False
  qk_norm: str = "none"
  norm_eps: float = 1e-6
  sliding_window: int | None = None  # causal: each token sees itself and W - 1 before it
  decode: bool = False  # keys/values of earlier calls kept in the "cache" collection
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def fused(self) -> bool:
    return self.num_kv_heads is None and not self.qkv_bias and self.qk_norm == "none"

  @nn.compact
  def __call__(self, x_BSD: jax.Array, *, mask_BS: jax.Array | None = None,
               positions_BS: jax.Array | None = None) -> jax.Array:
    B, S, D = x_BSD.shape
    H, Q = self.num_heads, self.head_dim
    x_BSD = x_BSD.astype(self.dtype)
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=0, out_axis=(1, 2))
    if self.fused:
      w_qkv = self.param("w_qkv_D3HQ", init, (D, 3, H, Q), self.param_dtype).astype(self.dtype)
      q, k, v = jnp.unstack(jnp.einsum("BSD,DZHQ->ZBSHQ", x_BSD, w_qkv))
    else:
      q, k, v = self._project_separately(x_BSD, init)
    if self.rope:
      if positions_BS is None:
        positions_BS = jnp.broadcast_to(jnp.arange(S), (B, S))
      q = apply_rope(q, positions_BS, self.rope_max_wavelength)
      k = apply_rope(k, positions_BS, self.rope_max_wavelength)
    # Fewer key/value heads than query heads: dot_product_attention shares each across
    # H / Y query heads.
    if self.decode:
      o_BSHQ = attend_with_cache(self, q, k, v, mask_BS, self.sliding_window)
    else:
      mask = None if mask_BS is None else mask_BS[:, None, None, :].astype(bool)
      window = None if self.sliding_window is None else (self.sliding_window - 1, 0)
      o_BSHQ = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal,
                                            local_window_size=window)
    o_BSHQ = self.weight_heads(x_BSD, o_BSHQ, mask_BS)
    out_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=(0, 1), out_axis=2)
    w_out = self.param("w_out_HQD", out_init, (H, Q, D), self.param_dtype).astype(self.dtype)
    return jnp.einsum("BSHQ,HQD->BSD", o_BSHQ, w_out)

  def weight_heads(self, x_BSD, o_BSHQ, mask_BS):
    """Each head's output before the output projection; a subclass may weight heads per
    token (mixture of heads, moh.py). Plain multi-head attention keeps them as they are."""
    del x_BSD, mask_BS
    return o_BSHQ

  def _project_separately(self, x_BSD, init):
    D, H, Q = x_BSD.shape[-1], self.num_heads, self.head_dim
    Y = self.num_kv_heads or H
    w = lambda name, heads: self.param(name, init, (D, heads, Q), self.param_dtype).astype(
        self.dtype)
    q = jnp.einsum("BSD,DHQ->BSHQ", x_BSD, w("w_q_DHQ", H))
    k = jnp.einsum("BSD,DYQ->BSYQ", x_BSD, w("w_k_DYQ", Y))
    v = jnp.einsum("BSD,DYQ->BSYQ", x_BSD, w("w_v_DYQ", Y))
    if self.qkv_bias:
      b = lambda name, heads: self.param(name, nn.initializers.zeros_init(), (heads, Q),
                                         self.param_dtype).astype(self.dtype)
      q, k, v = (q + b("b_q_HQ", H)[None, None], k + b("b_k_YQ", Y)[None, None],
                 v + b("b_v_YQ", Y)[None, None])
    if self.qk_norm != "none":
      norm = lambda name: nn.RMSNorm(self.norm_eps, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
      if self.qk_norm == "head":
        q, k = norm("q_norm")(q), norm("k_norm")(k)
      else:  # "full": over every head's features together
        q = norm("q_norm")(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
        k = norm("k_norm")(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
    return q, k, v
