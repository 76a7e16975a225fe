"""Routers (registered by name) and the RoutingDecision they return.

Built in: "top_k" (top_k.py), "expert_choice" (expert_choice.py), "conditioned"
(conditioned.py: task / modality / noise-level routing, expert cache). A new router is
one file here that registers itself; `ROUTERS.get(name)` imports
`moe_jax.nn.routing.<name>` on first use.
"""
from moe_jax.nn.routing.base import (LAYER_FIELDS, ROUTER_STATE, ROUTERS, RouterSpec,
                                     RoutingDecision, check_router_spec, check_token_mask,
                                     make_router, resolve_group_size, router_logits,
                                     router_options, token_choice_capacity)
# Import order is registration order (ROUTERS.names()).
from moe_jax.nn.routing.top_k import TopKRouter  # isort: skip
from moe_jax.nn.routing.expert_choice import ExpertChoiceRouter, expert_choice_capacity
from moe_jax.nn.routing.conditioned import ConditionedRouter, condition_router_flops

__all__ = [
    "ConditionedRouter", "ExpertChoiceRouter", "LAYER_FIELDS", "ROUTER_STATE", "ROUTERS",
    "RouterSpec", "RoutingDecision", "TopKRouter", "check_router_spec", "check_token_mask",
    "condition_router_flops", "expert_choice_capacity", "make_router", "resolve_group_size",
    "router_logits", "router_options", "token_choice_capacity",
]
