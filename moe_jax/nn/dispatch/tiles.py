"""What the tile-layout dispatchers (pallas, tiled) share: the row tile, the layout and
the FFN over it, parameterised by the grouped ops each one brings (TileOps).

Axis letters: T tokens, D model dim, E experts, K slots per token, F expert hidden,
R padded rows (every row tile belongs to one expert).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moe_jax.nn.dispatch.base import Metrics, check_inputs, zero_drops
from moe_jax.nn.experts import ExpertWeights
from moe_jax.nn.routing import RoutingDecision


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

  matmul(lhs_RA, rhs_EAO, layout) -> [R, O]; permute(x_TD, layout, K) -> [R, D];
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


def tile_padded_ffn(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights,
                     ops: TileOps, block_m: int) -> tuple[jax.Array, Metrics]:
  """Dropless FFN over a tile-padded expert layout with the given grouped ops.

  Slots are sorted by expert and each expert's rows padded to a multiple of the row
  tile, so every tile is one dense matmul against one expert.
  """
  check_inputs(x_TD, decision, experts)
  K = decision.expert_index_TK.shape[1]
  layout = decision_layout(decision, experts.num_experts, block_m)
  x_RD = ops.permute(x_TD, layout, K)
  if experts.w_gate_EDF is not None and ops.swiglu_ffn is not None:
    y_RD = ops.swiglu_ffn(x_RD, experts.w_gate_EDF, experts.w_up_EDF, experts.w_down_EFD, layout)
    return combined(ops, y_RD, layout, decision, x_TD.dtype)
  if experts.w_gate_EDF is not None and ops.swiglu is not None:
    h_RF = ops.swiglu(x_RD, experts.w_gate_EDF, experts.w_up_EDF, layout)
  elif experts.w_gate_EDF is not None:
    F = experts.w_up_EDF.shape[2]
    gate_up = ops.matmul(x_RD, jnp.concatenate([experts.w_gate_EDF, experts.w_up_EDF], axis=2),
                         layout)
    h_RF = jax.nn.silu(gate_up[:, :F]) * gate_up[:, F:]
  else:
    h_RF = ops.matmul(x_RD, experts.w_up_EDF, layout)
    if experts.activation != "linear":  # linear: LoRA experts, (x @ A) @ B
      h_RF = jax.nn.gelu(h_RF)
  y_RD = ops.matmul(h_RF.astype(experts.w_down_EFD.dtype), experts.w_down_EFD, layout)
  return combined(ops, y_RD, layout, decision, x_TD.dtype)


def combined(ops: TileOps, y_RD, layout, decision: RoutingDecision, dtype):
  weight_TK = jnp.where(decision.valid_TK(), decision.weight_TK, 0.0)
  y_TD = ops.combine(y_RD, layout, weight_TK).astype(dtype)
  return y_TD, zero_drops()
