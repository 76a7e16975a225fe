"""Dispatchers: move tokens to experts and combine the results.

Axis letters: T tokens, D model dim, E experts, K slots per token,
G groups, S tokens per group, C capacity per expert and group.

Each dispatcher is a pure function
`fn(x_TD, decision, experts, capacity=None) -> (y_TD, metrics)`:
  - "einsum": one-hot dispatch/combine tensors with a fixed capacity per expert
    and group (static shapes; the TPU-friendly baseline). Slots past capacity are
    dropped in priority order and `metrics["dropped_fraction"]` reports the share.
  - "sorted": dropless. Slots are argsorted by expert, each expert's rows run as
    one ragged group (jax.lax.ragged_dot), then unsorted and combined.
  - "dense": every expert on every token, weighted; a reference, O(E) compute.
  - "pallas": dropless, kernels_pallas grouped matmul over a tile-padded layout
    (Pallas kernels on GPU/TPU, interpret mode on CPU).
  - "tiled": dropless, the same layout with per-tile gathered weights and one XLA
    batched matmul (no kernels; the fast dropless path on CPU).
  - "auto": the fastest dropless one for the platform (AUTO_DISPATCH).
With no slot over capacity, all give the numbers of a plain loop over experts.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moe_jax import validation as V
from moe_jax.config import DISPATCHERS
from moe_jax.experts import ExpertWeights
from moe_jax.routing import RoutingDecision, resolve_group_size, token_choice_capacity

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class CapacityOptions:
  """How capacity-limited dispatchers size their buffers (dropless ones ignore it)."""

  capacity_factor: float = 1.25
  group_size: int | None = None
  min_capacity: int = 1


def _check_inputs(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights) -> None:
  V.check_rank("dispatch input x_TD", x_TD, 2, "tokens, model dim")
  if decision.num_tokens != x_TD.shape[0]:
    raise ValueError(f"routing decision covers T={decision.num_tokens} tokens but x_TD has "
                     f"T={x_TD.shape[0]}")
  if experts.d_model != x_TD.shape[1]:
    raise ValueError(f"x_TD has model dim D={x_TD.shape[1]} but the experts expect "
                     f"D={experts.d_model}")


def assign_capacity_slots(decision: RoutingDecision, num_experts: int, group_size: int,
                          capacity: int) -> tuple[jax.Array, jax.Array]:
  """Position of each slot in its expert's buffer, and whether it fits.

  Within each group, slots fill their expert's C places in order: all first
  choices before any second choice (Switch/V-MoE), and within one choice rank by
  token order or, when `decision.priority_T` is set, by descending priority.
  Returns (position_TK int32, keep_TK bool).
  """
  T, K = decision.expert_index_TK.shape
  S, E = group_size, num_experts
  G = T // S
  valid_GSK = decision.valid_TK().reshape(G, S, K)
  index_GSK = decision.expert_index_TK.reshape(G, S, K)
  if decision.priority_T is not None:
    order_GS = jnp.argsort(-decision.priority_T.reshape(G, S), axis=1, stable=True)
  else:
    order_GS = jnp.broadcast_to(jnp.arange(S), (G, S))
  take = lambda a: jnp.take_along_axis(a, order_GS[:, :, None], axis=1)
  onehot_GSKE = jax.nn.one_hot(take(index_GSK), E, dtype=jnp.int32) * take(valid_GSK)[..., None]
  # Rank k of every token comes before rank k+1 of any token.
  onehot_GKSE = onehot_GSKE.transpose(0, 2, 1, 3).reshape(G, K * S, E)
  position_GKSE = jnp.cumsum(onehot_GKSE, axis=1) - 1
  position_GSK = jnp.sum(position_GKSE * onehot_GKSE, axis=-1).reshape(G, K, S).transpose(0, 2, 1)
  # Undo the priority order.
  inverse_GS = jnp.argsort(order_GS, axis=1)
  position_GSK = jnp.take_along_axis(position_GSK, inverse_GS[:, :, None], axis=1)
  keep_GSK = valid_GSK & (position_GSK < capacity)
  return position_GSK.reshape(T, K).astype(jnp.int32), keep_GSK.reshape(T, K)


def einsum_dispatch(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights,
                    capacity: CapacityOptions | None = None) -> tuple[jax.Array, Metrics]:
  """One-hot dispatch with per-group capacity (drops overflow)."""
  _check_inputs(x_TD, decision, experts)
  opts = capacity or CapacityOptions()
  T, D = x_TD.shape
  K = decision.expert_index_TK.shape[1]
  E = experts.num_experts
  S = decision.group_size or resolve_group_size(T, opts.group_size)
  G = T // S
  C = decision.capacity or token_choice_capacity(S, K, E, opts.capacity_factor,
                                                 opts.min_capacity)
  position_TK, keep_TK = assign_capacity_slots(decision, E, S, C)
  dt = x_TD.dtype
  expert_GSKE = jax.nn.one_hot(decision.expert_index_TK, E, dtype=dt).reshape(G, S, K, E)
  slot_GSKC = jax.nn.one_hot(jnp.where(keep_TK, position_TK, C), C, dtype=dt).reshape(G, S, K, C)
  dispatch_GSEC = jnp.einsum("GSKE,GSKC->GSEC", expert_GSKE, slot_GSKC)
  weight_GSK = jnp.where(keep_TK, decision.weight_TK, 0.0).astype(dt).reshape(G, S, K)
  combine_GSEC = jnp.einsum("GSKE,GSKC,GSK->GSEC", expert_GSKE, slot_GSKC, weight_GSK)
  x_GSD = x_TD.reshape(G, S, D)
  x_EGCD = jnp.einsum("GSEC,GSD->EGCD", dispatch_GSEC, x_GSD)
  y_EXD = experts.batched(x_EGCD.reshape(E, G * C, D))
  y_GSD = jnp.einsum("GSEC,EGCD->GSD", combine_GSEC, y_EXD.reshape(E, G, C, D))
  valid = decision.valid_TK()
  dropped = 1.0 - keep_TK.sum() / jnp.maximum(valid.sum(), 1)
  return y_GSD.reshape(T, D), {"dropped_fraction": dropped.astype(jnp.float32)}


def sort_slots_by_expert(decision: RoutingDecision, num_experts: int):
  """Order of the T*K slots sorted by expert (unused slots last) and group sizes.

  Returns (order_X, group_sizes_E, valid_X) where X = T*K flattened slots, so
  slot order_X[i] is the i-th row in expert-sorted order and its token is
  order_X[i] // K.
  """
  valid_X = decision.valid_TK().reshape(-1)
  expert_X = jnp.where(valid_X, decision.expert_index_TK.reshape(-1), num_experts)
  order_X = jnp.argsort(expert_X, stable=True)
  group_sizes_E = jnp.bincount(expert_X, length=num_experts + 1)[:num_experts]
  return order_X, group_sizes_E.astype(jnp.int32), valid_X


def sorted_dispatch(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights,
                    capacity: CapacityOptions | None = None) -> tuple[jax.Array, Metrics]:
  """Dropless: sort slots by expert, one ragged grouped matmul, unsort, combine."""
  del capacity  # dropless
  _check_inputs(x_TD, decision, experts)
  K = decision.expert_index_TK.shape[1]
  order_X, group_sizes_E, valid_X = sort_slots_by_expert(decision, experts.num_experts)
  x_XD = jnp.take(x_TD, order_X // K, axis=0)
  y_XD = experts.ragged(x_XD, group_sizes_E)
  y_TD = unsort_combine(y_XD, order_X, valid_X, decision.weight_TK, K)
  return y_TD, {"dropped_fraction": jnp.zeros((), jnp.float32)}


def unsort_combine(y_XD: jax.Array, order_X: jax.Array, valid_X: jax.Array,
                   weight_TK: jax.Array, K: int) -> jax.Array:
  """Rows in expert-sorted slot order -> [T, D]: weighted sum over each token's K slots.

  Unused slots were sorted past the last group: their rows are zeroed (unspecified).
  """
  X, D = y_XD.shape
  y_XD = jnp.where(jnp.take(valid_X, order_X)[:, None], y_XD, jnp.zeros((), y_XD.dtype))
  inverse_X = jnp.zeros_like(order_X).at[order_X].set(jnp.arange(X, dtype=order_X.dtype))
  y_TKD = jnp.take(y_XD, inverse_X, axis=0).reshape(X // K, K, D)
  w_TK = jnp.where(valid_X.reshape(-1, K), weight_TK, 0.0).astype(y_XD.dtype)
  return jnp.einsum("TKD,TK->TD", y_TKD, w_TK)


def dense_dispatch(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights,
                   capacity: CapacityOptions | None = None) -> tuple[jax.Array, Metrics]:
  """Reference: every expert on every token, combined by the routing weights."""
  del capacity
  _check_inputs(x_TD, decision, experts)
  E = experts.num_experts
  y_ETD = experts.batched(jnp.broadcast_to(x_TD, (E,) + x_TD.shape))
  gates_TE = decision.gates_TE(E).astype(x_TD.dtype)
  return jnp.einsum("TE,ETD->TD", gates_TE, y_ETD), {"dropped_fraction": jnp.zeros((), jnp.float32)}


def tile_block_m(num_slots: int, num_experts: int, accelerator: bool) -> int:
  """Row tile: 128 on accelerators. On CPU (a loop over used tiles) about a quarter of
  the mean group size, 16..128: padding stays small and each dot stays big enough
  (measured 2026-11-30 at the three CPU bench shapes: kernels_pallas/NOTES.md)."""
  if accelerator:
    return 128
  quarter = max(1, num_slots // max(num_experts, 1) // 4)
  return min(128, max(16, 1 << (quarter.bit_length() - 1)))


@dataclasses.dataclass(frozen=True)
class TileOps:
  """The pieces a tile-layout dispatcher runs; each takes the TileLayout.

  matmul(lhs_RK, rhs_EKN, layout) -> [R, N]; permute(x_TD, layout, K) -> [R, D];
  combine(y_RD, layout, weight_TK) -> [T, D]; swiglu(x_RD, w_gate, w_up, layout) -> [R, F]
  or None to run SwiGLU as one matmul against [w_gate | w_up] plus an XLA epilogue;
  swiglu_ffn(x_RD, w_gate, w_up, w_down, layout) -> [R, D], the whole SwiGLU expert FFN
  in one op (None: composed from the others).
  """

  matmul: Callable[..., jax.Array]
  permute: Callable[..., jax.Array]
  combine: Callable[..., jax.Array]
  swiglu: Callable[..., jax.Array] | None = None
  swiglu_ffn: Callable[..., jax.Array] | None = None


def decision_layout(decision: RoutingDecision, num_experts: int, block_m: int):
  """Tile layout for a decision: from the fused router's positions when it gave them
  (no sort), else by sorting the slots by expert."""
  from kernels_pallas import tiling  # pylint: disable=import-outside-toplevel
  if decision.position_TK is not None and decision.mask_TK is None:
    return tiling.layout_from_ranks(decision.expert_index_TK.reshape(-1),
                                    decision.position_TK.reshape(-1), decision.counts_E, block_m)
  return tiling.make_tile_layout(decision.expert_index_TK.reshape(-1),
                                 decision.valid_TK().reshape(-1), num_experts, block_m)


def _tile_padded_ffn(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights,
                     ops: TileOps, block_m: int) -> tuple[jax.Array, Metrics]:
  """Dropless FFN over a tile-padded expert layout with the given grouped ops.

  Slots are sorted by expert and each expert's rows padded to a multiple of the row
  tile, so every tile is one dense matmul against one expert.
  """
  _check_inputs(x_TD, decision, experts)
  K = decision.expert_index_TK.shape[1]
  layout = decision_layout(decision, experts.num_experts, block_m)
  x_RD = ops.permute(x_TD, layout, K)
  if experts.w_gate_EDF is not None and ops.swiglu_ffn is not None:
    y_RD = ops.swiglu_ffn(x_RD, experts.w_gate_EDF, experts.w_up_EDF, experts.w_down_EFD, layout)
    return _combined(ops, y_RD, layout, decision, x_TD.dtype)
  if experts.w_gate_EDF is not None and ops.swiglu is not None:
    h_RF = ops.swiglu(x_RD, experts.w_gate_EDF, experts.w_up_EDF, layout)
  elif experts.w_gate_EDF is not None:
    F = experts.w_up_EDF.shape[2]
    gate_up = ops.matmul(x_RD, jnp.concatenate([experts.w_gate_EDF, experts.w_up_EDF], axis=2),
                         layout)
    h_RF = jax.nn.silu(gate_up[:, :F]) * gate_up[:, F:]
  else:
    h_RF = jax.nn.gelu(ops.matmul(x_RD, experts.w_up_EDF, layout))
  y_RD = ops.matmul(h_RF.astype(experts.w_down_EFD.dtype), experts.w_down_EFD, layout)
  return _combined(ops, y_RD, layout, decision, x_TD.dtype)


def _combined(ops: TileOps, y_RD, layout, decision: RoutingDecision, dtype):
  weight_TK = jnp.where(decision.valid_TK(), decision.weight_TK, 0.0)
  y_TD = ops.combine(y_RD, layout, weight_TK).astype(dtype)
  return y_TD, {"dropped_fraction": jnp.zeros((), jnp.float32)}


def pallas_tile_ops(platform: str) -> TileOps:
  """The kernels_pallas ops for a platform. GPU (and CPU, in interpret mode): Triton-style
  kernels incl. the permute/combine gathers and the fused SwiGLU gmm. TPU: the Mosaic
  grouped matmul (scalar-prefetched tile->expert map) with XLA gathers for permute and
  combine (row gathers by a vector of indices do not map onto Mosaic blocks)."""
  # pylint: disable=import-outside-toplevel
  from kernels_pallas import gmm, gmm_tpu, permute, swiglu
  if platform == "tpu":
    return TileOps(gmm_tpu.grouped_matmul_tpu,
                   functools.partial(permute.permute_tokens, xla=True),
                   functools.partial(permute.unpermute_combine, xla=True))
  return TileOps(gmm.grouped_matmul, permute.permute_tokens, permute.unpermute_combine,
                 swiglu.grouped_swiglu)


def pallas_dispatch(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights,
                    capacity: CapacityOptions | None = None,
                    block_m: int | None = None) -> tuple[jax.Array, Metrics]:
  """Dropless with the kernels_pallas kernels: permute, grouped matmul (with the fused
  SwiGLU epilogue on GPU), unpermute+combine. Interpret mode on CPU: correct but slow."""
  del capacity  # dropless
  platform = jax.default_backend()
  block_m = block_m or tile_block_m(decision.expert_index_TK.size, experts.num_experts,
                                    platform != "cpu")
  return _tile_padded_ffn(x_TD, decision, experts, pallas_tile_ops(platform), block_m)


def tiled_dispatch(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights,
                   capacity: CapacityOptions | None = None,
                   block_m: int | None = None) -> tuple[jax.Array, Metrics]:
  """Dropless in plain XLA over the same tile-padded layout (no Pallas, no ragged_dot).

  On CPU the expert FFN is one while loop over the used tiles (f32 dots, weights read in
  place: kernels_pallas/tile_loop.py); elsewhere each tile's weights are gathered and
  one batched matmul runs (tile_gather.py). Permute and combine are gathers both ways.
  """
  del capacity  # dropless
  # pylint: disable=import-outside-toplevel
  from kernels_pallas import permute, tile_gather, tile_loop
  cpu = jax.default_backend() == "cpu"
  block_m = block_m or tile_block_m(decision.expert_index_TK.size, experts.num_experts, not cpu)
  gathers = dict(permute=functools.partial(permute.permute_tokens, xla=True),
                 combine=functools.partial(permute.unpermute_combine, xla=True))
  if cpu:
    ops = TileOps(tile_loop.tile_loop_matmul, swiglu_ffn=tile_loop.tile_loop_swiglu_ffn, **gathers)
  else:
    ops = TileOps(tile_gather.tile_gather_matmul, **gathers)
  return _tile_padded_ffn(x_TD, decision, experts, ops, block_m)


# Dropless path `auto` takes per platform. cpu: measured (README table: tiled is the
# fastest dropless path there). gpu: tiled until the Pallas kernels are measured; the
# same tile-gather algorithm beat XLA's ragged_dot at every H200 shape of
# PERFORMANCE.md. tpu: not measured; ragged_dot lowers to a native grouped matmul.
AUTO_DISPATCH = {"cpu": "tiled", "gpu": "tiled", "tpu": "sorted"}


def auto_dispatch(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights,
                  capacity: CapacityOptions | None = None) -> tuple[jax.Array, Metrics]:
  """The fastest dropless dispatcher for this platform (AUTO_DISPATCH)."""
  return _REGISTRY[AUTO_DISPATCH.get(jax.default_backend(), "sorted")](x_TD, decision, experts,
                                                                       capacity)


Dispatcher = Callable[..., tuple[jax.Array, Metrics]]
_REGISTRY: dict[str, Dispatcher] = {
    "einsum": einsum_dispatch,
    "sorted": sorted_dispatch,
    "dense": dense_dispatch,
    "pallas": pallas_dispatch,
    "tiled": tiled_dispatch,
    "auto": auto_dispatch,
}
assert tuple(_REGISTRY) == DISPATCHERS


def get_dispatcher(name: str) -> Dispatcher:
  """The dispatch function registered under `name`."""
  V.check_choice("dispatch", name, _REGISTRY)
  return _REGISTRY[name]
