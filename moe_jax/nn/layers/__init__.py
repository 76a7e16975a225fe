"""MoE layers: MoELayer (router -> dispatch -> experts -> combine)."""
from moe_jax.nn.layers.moe import MoELayer

__all__ = ["MoELayer"]
