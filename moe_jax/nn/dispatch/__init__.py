"""Dispatchers (registered by name): einsum, sorted, dense, pallas, tiled, auto.

Each is `fn(x_TD, decision, experts, capacity=None) -> (y_TD, metrics)`; see base.py.
"""
# Import order is registration order (DISPATCHERS.names()).
from moe_jax.nn.dispatch.base import (DISPATCHERS, CapacityOptions, Dispatcher, Metrics,
                                      check_inputs, get_dispatcher)
from moe_jax.nn.dispatch.einsum import assign_capacity_slots, einsum_dispatch
from moe_jax.nn.dispatch.sorted import sort_slots_by_expert, sorted_dispatch, unsort_combine
from moe_jax.nn.dispatch.dense import dense_dispatch
from moe_jax.nn.dispatch.pallas import pallas_dispatch, pallas_tile_ops
from moe_jax.nn.dispatch.tiled import tiled_dispatch
from moe_jax.nn.dispatch.auto import AUTO_DISPATCH, auto_dispatch
from moe_jax.nn.dispatch.tiles import TileOps, decision_layout, tile_block_m

__all__ = [
    "AUTO_DISPATCH", "CapacityOptions", "DISPATCHERS", "Dispatcher", "Metrics", "TileOps",
    "assign_capacity_slots", "auto_dispatch", "check_inputs", "decision_layout",
    "dense_dispatch", "einsum_dispatch", "get_dispatcher", "pallas_dispatch",
    "pallas_tile_ops", "sort_slots_by_expert", "sorted_dispatch", "tile_block_m",
    "tiled_dispatch", "unsort_combine",
]
