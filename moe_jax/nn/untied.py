"""A modality-untied transformer block (Mixture-of-Transformers).

Liang et al., "Mixture-of-Transformers: A Sparse and Scalable Architecture for Multi-Modal
Foundation Models" (arXiv:2411.04996): every non-embedding parameter of a layer is per
modality, attention is global. For token x_t of modality m_t:
  q_t, k_t, v_t = AttnNorm_{m_t}(x_t) W^{qkv}_{m_t}
  o = softmax(q k^T / sqrt(Q)) v          one attention over the whole merged sequence
  x_t <- x_t + o_t W^O_{m_t}
  x_t <- x_t + FFN_{m_t}(FFNNorm_{m_t}(x_t))
The modality of each token comes from the Context (`modality_BS`, else the example's
`modality_id`). Each modality's weights live in their own submodule `modality_<m>` under
the usual names (w_qkv_D3HQ, w_out_HQD, attention_norm, ffn_norm, mlp), so sharding and
checkpoints treat them as ordinary parameters.

Every modality's projections and FFN run on every token and each token keeps its own
modality's result (a where-select): simple and exact, at num_modalities times the dense
FLOPs of those parts; attention itself is computed once. A token whose modality is outside
[0, num_modalities) gets zero q/k/v and zero updates (it passes through unchanged).

Axis letters: B batch, S sequence, D model dim, H heads, Q features per head, Z the q/k/v
index. Not supported (a config error): MoE FFNs, GQA, q/k norms, biases, MLA, MoH and
sliding windows in an untied layer; KV-cache decoding (an error when called).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config import TransformerConfig
from moe_jax.nn.attention import apply_rope
from moe_jax.nn.context import Context
from moe_jax.nn.experts import FeedForward


class _ModalityWeights(nn.Module):
  """One modality's norms, q/k/v and output projections and FFN."""

  config: TransformerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    D, H, Q = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    norm = lambda: nn.RMSNorm(cfg.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
    self.attention_norm, self.ffn_norm = norm(), norm()
    # The same initialisers as SelfAttention's.
    self.w_qkv_D3HQ = self.param("w_qkv_D3HQ", nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)), (D, 3, H, Q),
                                 self.param_dtype)
    self.w_out_HQD = self.param("w_out_HQD", nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2), (H, Q, D),
                                self.param_dtype)
    self.mlp = FeedForward(cfg.mlp_dim, cfg.activation, self.dtype, self.param_dtype)

  def qkv(self, x_BSD):
    return jnp.einsum("BSD,DZHQ->BSZHQ", self.attention_norm(x_BSD),
                      self.w_qkv_D3HQ.astype(self.dtype))

  def out(self, o_BSHQ):
    return jnp.einsum("BSHQ,HQD->BSD", o_BSHQ, self.w_out_HQD.astype(self.dtype))

  def ffn(self, x_BSD):
    return self.mlp(self.ffn_norm(x_BSD))


class UntiedBlock(nn.Module):
  """x + Attn(Norm(x)); then x + FFN(Norm(x)), each weight picked by the token's modality."""

  config: TransformerConfig
  use_moe: bool = False  # Block's signature; an untied layer is never MoE (a config error)
  deterministic: bool = True
  decode: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BSD: jax.Array, mask_BS: jax.Array | None = None,
               positions_BS: jax.Array | None = None,
               context: Context | None = None) -> jax.Array:
    cfg = self.config
    if self.decode:
      raise ValueError("untied_layers do not support KV-cache decoding; generate with a "
                       "model without untied_layers")
    B, S, _ = x_BSD.shape
    modality_BS = (context or Context()).token_modality(B, S)
    weights = [_ModalityWeights(cfg, self.dtype, self.param_dtype, name=f"modality_{m}")
               for m in range(cfg.resolved_num_modalities)]
    drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)

    def per_modality(fn):
      """fn(modality weights) for every modality; each token keeps its own modality's."""
      out = None
      for m, w in enumerate(weights):
        y = fn(w)
        keep = (modality_BS == m).reshape((B, S) + (1,) * (y.ndim - 2))
        out = jnp.where(keep, y, 0 if out is None else out)
      return out

    x_BSD = x_BSD.astype(self.dtype)
    q, k, v = jnp.unstack(per_modality(lambda w: w.qkv(x_BSD)), axis=2)
    if cfg.uses_rope:
      if positions_BS is None:
        positions_BS = jnp.broadcast_to(jnp.arange(S), (B, S))
      q = apply_rope(q, positions_BS, cfg.rope_max_wavelength)
      k = apply_rope(k, positions_BS, cfg.rope_max_wavelength)
    mask = None if mask_BS is None else mask_BS[:, None, None, :].astype(bool)
    o_BSHQ = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=cfg.causal)
    x_BSD = x_BSD + drop(per_modality(lambda w: w.out(o_BSHQ)))
    return x_BSD + drop(per_modality(lambda w: w.ffn(x_BSD)))
