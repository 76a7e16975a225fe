"""Expert banks (registered by name: "ffn") and the dense FFN used for shared experts."""
from moe_jax.config import ACTIVATIONS
from moe_jax.nn.experts.ffn import EXPERTS, ExpertBank, ExpertWeights, FeedForward

__all__ = ["ACTIVATIONS", "EXPERTS", "ExpertBank", "ExpertWeights", "FeedForward"]
