"""Multi-head self-attention with optional rotary position embeddings (RoPE).

Axis letters: B batch, S sequence, D model dim. H heads, Q features per
head (K is taken by "experts per token"), Z the q/k/v index (`3` in w_qkv_D3HQ).
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


class SelfAttention(nn.Module):
  """Multi-head self-attention; causal for decoders, key-padding mask optional."""

  num_heads: int
  head_dim: int
  causal: bool = False
  rope: bool = False
  rope_max_wavelength: float = 10_000.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BSD: jax.Array, *, mask_BS: jax.Array | None = None,
               positions_BS: jax.Array | None = None) -> jax.Array:
    B, S, D = x_BSD.shape
    H, Q = self.num_heads, self.head_dim
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=0, out_axis=(1, 2))
    w_qkv = self.param("w_qkv_D3HQ", init, (D, 3, H, Q), self.param_dtype).astype(self.dtype)
    q, k, v = jnp.unstack(jnp.einsum("BSD,DZHQ->ZBSHQ", x_BSD.astype(self.dtype), w_qkv))
    if self.rope:
      if positions_BS is None:
        positions_BS = jnp.broadcast_to(jnp.arange(S), (B, S))
      q = apply_rope(q, positions_BS, self.rope_max_wavelength)
      k = apply_rope(k, positions_BS, self.rope_max_wavelength)
    mask = None if mask_BS is None else mask_BS[:, None, None, :].astype(bool)
    o_BSHQ = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal)
    out_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=(0, 1), out_axis=2)
    w_out = self.param("w_out_HQD", out_init, (H, Q, D), self.param_dtype).astype(self.dtype)
    return jnp.einsum("BSHQ,HQD->BSD", o_BSHQ, w_out)
