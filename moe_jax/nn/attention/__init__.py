"""Attention: multi-head self-attention with RoPE, GQA and the KV cache (mha.py);
multi-head latent attention (mla.py)."""
from moe_jax.nn.attention.mha import SelfAttention, apply_rope, attend_with_cache
from moe_jax.nn.attention.mla import LatentAttention

__all__ = ["LatentAttention", "SelfAttention", "apply_rope", "attend_with_cache"]
