"""moe_jax: sparse Mixture-of-Experts transformers in JAX/Flax.

The pieces, each usable on its own (moe_jax.nn):
  routers      ROUTERS registry: "top_k", "expert_choice" -> RoutingDecision
  dispatchers  DISPATCHERS registry: get_dispatcher("einsum" | "sorted" | ...)
  experts      EXPERTS registry: "ffn" (ExpertBank -> ExpertWeights), FeedForward
  layer        MoELayer(MoEConfig) = router -> dispatch -> experts -> combine
  stacks       TransformerStack(TransformerConfig): encoder or causal decoder
  context      Context: what routers may condition on (task, modality, noise level)
  losses       load_balance_loss, router_z_loss, sum_aux_losses
Training (moe_jax.train), meshes (moe_jax.parallel), models, data: subpackages.
"""
from moe_jax.config import ACTIVATIONS, MoEConfig, TransformerConfig
from moe_jax.nn.attention import SelfAttention, apply_rope
from moe_jax.nn.context import Context
from moe_jax.nn.dispatch import (DISPATCHERS, CapacityOptions, assign_capacity_slots,
                                 dense_dispatch, einsum_dispatch, get_dispatcher, sorted_dispatch)
from moe_jax.nn.experts import EXPERTS, ExpertBank, ExpertWeights, FeedForward
from moe_jax.nn.layers import MoELayer
from moe_jax.nn.losses import (AUX_LOSS_COLLECTION, METRICS_COLLECTION, load_balance_loss,
                               router_entropy, router_z_loss, softmax_cross_entropy,
                               sum_aux_losses)
from moe_jax.nn.routing import (ROUTERS, ExpertChoiceRouter, RouterSpec, RoutingDecision,
                                TopKRouter, expert_choice_capacity, make_router,
                                token_choice_capacity)
from moe_jax.nn.transformer import Block, TransformerStack, scan_plan

__version__ = "0.2.0"

__all__ = [
    "ACTIVATIONS", "AUX_LOSS_COLLECTION", "Block", "CapacityOptions", "Context", "DISPATCHERS",
    "EXPERTS", "ExpertBank", "ExpertChoiceRouter", "ExpertWeights", "FeedForward",
    "METRICS_COLLECTION", "MoEConfig", "MoELayer", "ROUTERS", "RouterSpec", "RoutingDecision",
    "SelfAttention", "TopKRouter", "TransformerConfig", "TransformerStack", "apply_rope",
    "assign_capacity_slots", "dense_dispatch", "einsum_dispatch", "expert_choice_capacity",
    "get_dispatcher", "load_balance_loss", "make_router", "router_entropy", "router_z_loss",
    "scan_plan", "softmax_cross_entropy", "sorted_dispatch", "sum_aux_losses",
    "token_choice_capacity",
]
