"""Attention: multi-head self-attention with RoPE (mha.py)."""
from moe_jax.nn.attention.mha import SelfAttention, apply_rope

__all__ = ["SelfAttention", "apply_rope"]
