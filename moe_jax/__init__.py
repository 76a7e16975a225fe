"""moe_jax: sparse Mixture-of-Experts transformers in JAX/Flax.

The pieces, each usable on its own:
  routers      TopKRouter, ExpertChoiceRouter -> RoutingDecision
  dispatchers  get_dispatcher("einsum" | "sorted" | "dense")
  experts      ExpertBank -> ExpertWeights, FeedForward (shared experts)
  layer        MoELayer(MoEConfig) = router -> dispatch -> experts -> combine
  stacks       TransformerStack(TransformerConfig): encoder or causal decoder
  losses       load_balance_loss, router_z_loss, sum_aux_losses
"""
from moe_jax.attention import SelfAttention, apply_rope
from moe_jax.config import ACTIVATIONS, DISPATCHERS, ROUTERS, MoEConfig, TransformerConfig
from moe_jax.dispatch import (CapacityOptions, assign_capacity_slots, dense_dispatch,
                              einsum_dispatch, get_dispatcher, sorted_dispatch)
from moe_jax.experts import ExpertBank, ExpertWeights, FeedForward
from moe_jax.layers import MoELayer
from moe_jax.losses import (AUX_LOSS_COLLECTION, METRICS_COLLECTION, load_balance_loss,
                            router_entropy, router_z_loss, softmax_cross_entropy,
                            sum_aux_losses)
from moe_jax.routing import (ExpertChoiceRouter, RoutingDecision, TopKRouter,
                             expert_choice_capacity, make_router, token_choice_capacity)
from moe_jax.transformer import Block, TransformerStack, scan_plan

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS", "AUX_LOSS_COLLECTION", "Block", "CapacityOptions", "DISPATCHERS",
    "ExpertBank", "ExpertChoiceRouter", "ExpertWeights", "FeedForward", "METRICS_COLLECTION",
    "MoEConfig", "MoELayer", "ROUTERS", "RoutingDecision", "SelfAttention", "TopKRouter",
    "TransformerConfig", "TransformerStack", "apply_rope", "assign_capacity_slots",
    "dense_dispatch", "einsum_dispatch", "expert_choice_capacity", "get_dispatcher",
    "load_balance_loss", "make_router", "router_entropy", "router_z_loss", "scan_plan",
    "softmax_cross_entropy", "sorted_dispatch", "sum_aux_losses", "token_choice_capacity",
]
