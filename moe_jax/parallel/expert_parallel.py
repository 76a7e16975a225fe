"""Expert parallelism: experts sharded over the `expert` mesh axis, tokens exchanged
inside `jax.shard_map`.

Axis letters: T tokens (local to a device inside shard_map), K slots per token,
D model dim, E experts, L experts per device, N devices on the expert axis,
C capacity per expert and device, X = T*K slots, R rows a device receives.

Every device routes its own tokens (the router ran before, on the global array), sends
each slot's token row to the device holding its expert, runs its L local experts with
a single-device dispatcher (`local_dispatch`), sends the results back and combines.

Modes:
  capacity  fixed [E, C, D] buffers and `all_to_all` (static shapes, TPU-friendly).
            Slots past C are dropped like the einsum dispatcher with groups of the
            tokens of one device (top-k: C = ceil(cf * T * K / E)). Expert-choice
            decisions already hold C per group, so C = that * groups per device and
            nothing is dropped: the same numbers as on one device.
  dropless  slots sorted by expert, exchanged with `ragged_exchange` (the
            ragged_all_to_all collective on GPU/TPU, a padded all_to_all on CPU);
            never drops: the same numbers as the dropless dispatchers.
  auto      capacity for `einsum` and for expert choice, dropless otherwise, so a
            layer keeps the semantics it has on one device.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax import validation as V
from moe_jax.config import EXPERT_PARALLEL_MODES
from moe_jax.nn.dispatch import (DISPATCHERS, CapacityOptions, assign_capacity_slots,
                                 get_dispatcher, sort_slots_by_expert, unsort_combine)
from moe_jax.nn.experts import ExpertWeights
from moe_jax.parallel.ragged_exchange import ragged_exchange
from moe_jax.nn.routing import RoutingDecision, token_choice_capacity

MODES = EXPERT_PARALLEL_MODES
TOKEN_AXES = ("data", "fsdp", "expert")


def expert_axis_size(mesh=None, expert_axis: str = "expert") -> int:
  """Devices on the expert axis of `mesh` (default: the mesh in context; 1 without one)."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  return 1 if mesh.empty else dict(mesh.shape).get(expert_axis, 1)


def resolve_mode(mode: str, local_dispatch: str, decision: RoutingDecision) -> str:
  V.check_choice("expert_parallel", mode, MODES)
  if mode != "auto":
    return mode
  return "capacity" if local_dispatch == "einsum" or decision.capacity is not None else "dropless"


def _local_view(decision: RoutingDecision, pad: int) -> RoutingDecision:
  """What the exchange needs, T padded by `pad` rows whose slots are all unused.

  Fields describing the global layout (e.g. a fused router's positions) are dropped:
  each device lays out its own slots.
  """
  rows = lambda a, v: a if not pad else jnp.concatenate(
      [a, jnp.full((pad,) + a.shape[1:], v, a.dtype)])
  priority = decision.priority_T
  return RoutingDecision(
      expert_index_TK=rows(decision.expert_index_TK, 0), weight_TK=rows(decision.weight_TK, 0),
      mask_TK=rows(decision.valid_TK(), False),
      priority_T=None if priority is None else rows(priority, -jnp.inf),
      capacity=decision.capacity, group_size=decision.group_size)


def local_ffn(dispatch: str, x_RD: jax.Array, expert_R: jax.Array, valid_R: jax.Array,
              experts: ExpertWeights) -> jax.Array:
  """Row r through local expert expert_R[r] with a single-device dispatcher (0 if invalid)."""
  R = x_RD.shape[0]
  decision = RoutingDecision(expert_index_TK=expert_R[:, None].astype(jnp.int32),
                             weight_TK=jnp.ones((R, 1), jnp.float32), mask_TK=valid_R[:, None])
  # einsum: one group with C = R, so nothing is dropped (O(R^2) one-hots: a reference).
  roomy = CapacityOptions(capacity_factor=float(experts.num_experts), group_size=None)
  return get_dispatcher(dispatch)(x_RD, decision, experts, roomy)[0]


def _exclusive_cumsum(a, axis=0):
  return jnp.cumsum(a, axis=axis) - a


def expert_parallel_ffn(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights,
                        mesh=None, *, mode: str = "capacity", local_dispatch: str = "einsum",
                        capacity_factor: float = 1.25, min_capacity: int = 1,
                        ragged: bool | None = None, expert_axis: str = "expert",
                        token_axes: Sequence[str] = TOKEN_AXES):
  """Expert-parallel MoE FFN over `mesh` (default: the mesh in context).

  Returns (y_TD, kept_TK): which valid slots ran (capacity mode drops past C per
  device; dropless keeps all). `ragged` (dropless only): use
  jax.lax.ragged_all_to_all (True), the padded emulation (False) or pick by
  backend (None). T need not divide over the token shards: padded with unused rows.
  """
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  E, N = experts.num_experts, expert_axis_size(mesh, expert_axis)
  if E % N:
    raise ValueError(f"num_experts={E} is not divisible by mesh.{expert_axis}={N}")
  mode = resolve_mode(mode, local_dispatch, decision)
  sizes = dict(mesh.shape)
  token_axes = tuple(a for a in token_axes if a in sizes)
  shards = 1
  for a in token_axes:
    shards *= sizes[a]
  T, K = decision.expert_index_TK.shape
  S = decision.group_size if decision.capacity is not None else None  # expert choice
  pad = -T % (shards * (S or 1))  # whole groups on one device
  dec = _local_view(decision, pad)
  x_pad = jnp.pad(x_TD, ((0, pad), (0, 0)))
  t, L = (T + pad) // shards, E // N
  if S:  # router-enforced capacity per group: the exact per-device bound
    cap = decision.capacity * (t // S)
  else:
    cap = token_choice_capacity(t, K, E, capacity_factor, min_capacity)
  tok, w_spec = P(token_axes), P(expert_axis, None, None)
  has_gate, has_priority = experts.w_gate_EDF is not None, dec.priority_T is not None

  def local(x_TD, index_TK, weight_TK, valid_TK, priority_T, w_up, w_down, w_gate):
    ex = ExpertWeights(w_up, w_down, w_gate, experts.activation)
    d = RoutingDecision(expert_index_TK=index_TK, weight_TK=weight_TK, mask_TK=valid_TK,
                        priority_T=priority_T, capacity=dec.capacity, group_size=dec.group_size)
    if mode == "capacity":
      y_TD, kept = _capacity_local(x_TD, d, ex, E, N, cap, local_dispatch, expert_axis)
    else:
      y_TD, kept = _dropless_local(x_TD, d, ex, E, N, cap if S else None, local_dispatch,
                                   expert_axis, ragged)
    return y_TD, kept

  # pallas (and auto, which may pick it) do not type their values' varying mesh axes yet
  # (pallas_call out_shapes carry none), which check_vma needs; without the check,
  # shard_map still psums the replicated weights' cotangents (tested).
  fn = jax.shard_map(local, mesh=mesh,
                     in_specs=(tok, tok, tok, tok, tok if has_priority else None,
                               w_spec, w_spec, w_spec if has_gate else None),
                     out_specs=(tok, tok),
                     # Dispatchers registered vma_clean carry their varying mesh axes
                     # (tiled's loops build carries with zeros_like, psum cotangents).
                     check_vma=DISPATCHERS.meta(local_dispatch)["vma_clean"])
  y_TD, kept_TK = fn(x_pad, dec.expert_index_TK, dec.weight_TK, dec.valid_TK(), dec.priority_T,
                     experts.w_up_EDF, experts.w_down_EFD, experts.w_gate_EDF)
  return y_TD[:T], kept_TK[:T]


def _capacity_local(x_TD, decision, experts, E, N, C, dispatch, axis):
  """[E, C, D] buffers -> all_to_all -> local experts -> all_to_all back -> combine."""
  t, D = x_TD.shape
  K, L = decision.expert_index_TK.shape[1], E // N
  index_TK = decision.expert_index_TK
  position_TK, keep_TK = assign_capacity_slots(decision, E, t, C)
  slot_TK = jnp.where(keep_TK, position_TK, C)  # C = out of range: dropped
  rows_TKD = jnp.broadcast_to(x_TD[:, None, :], (t, K, D))
  buf_ECD = jnp.zeros((E, C, D), x_TD.dtype).at[index_TK, slot_TK].set(rows_TKD, mode="drop")
  # Expert e lives on device e // L: exchange [N, L, C, D] blocks (and their fill counts).
  recv_NLCD = jax.lax.all_to_all(buf_ECD.reshape(N, L, C, D), axis, 0, 0, tiled=True)
  if dispatch == "einsum":  # dense over the whole buffer, empty slots included
    y_LXD = experts.batched(recv_NLCD.transpose(1, 0, 2, 3).reshape(L, N * C, D))
    y_NLCD = y_LXD.reshape(L, N, C, D).transpose(1, 0, 2, 3)
  else:  # only filled slots, through the chosen dispatcher
    count_E = jnp.bincount(jnp.where(keep_TK, index_TK, E).reshape(-1), length=E + 1)[:E]
    recv_count_NL = jax.lax.all_to_all(count_E.reshape(N, L), axis, 0, 0, tiled=True)
    valid_NLC = jnp.arange(C)[None, None, :] < recv_count_NL[:, :, None]
    expert_NLC = jnp.broadcast_to(jnp.arange(L)[None, :, None], (N, L, C))
    y_RD = local_ffn(dispatch, recv_NLCD.reshape(-1, D), expert_NLC.reshape(-1),
                     valid_NLC.reshape(-1), experts)
    y_NLCD = y_RD.reshape(N, L, C, D)
  back_ECD = jax.lax.all_to_all(y_NLCD, axis, 0, 0, tiled=True).reshape(E, C, D)
  y_TKD = back_ECD.at[index_TK, jnp.minimum(slot_TK, C - 1)].get(mode="clip")
  w_TK = jnp.where(keep_TK, decision.weight_TK, 0.0).astype(x_TD.dtype)
  return jnp.einsum("TKD,TK->TD", y_TKD, w_TK), keep_TK


def _dropless_local(x_TD, decision, experts, E, N, expert_cap, dispatch, axis, ragged):
  """Sort slots by expert -> ragged exchange -> local experts -> ragged exchange back.

  Static buffer sizes need a bound on what one device sends one peer: a token's K
  slots name distinct experts (both routers guarantee it), so at most min(K, L) of
  them go to one device; expert choice also bounds each expert by `expert_cap`.
  """
  t, D = x_TD.shape
  K, L = decision.expert_index_TK.shape[1], E // N
  M = t * min(K, L)
  if expert_cap is not None:
    M = min(M, L * expert_cap)
  order_X, sizes_E, valid_X = sort_slots_by_expert(decision, E)
  x_XD = jnp.take(x_TD, order_X // K, axis=0)
  # Every device's rows per expert; from them each device derives all sizes and offsets.
  counts_NNL = jax.lax.all_gather(sizes_E, axis).reshape(N, N, L)  # [source, dest, local]
  rows_NN = counts_NNL.sum(-1)
  me = jax.lax.axis_index(axis)
  send_N, recv_N = rows_NN[me], rows_NN[:, me]
  send_off_NN = _exclusive_cumsum(rows_NN, axis=1)  # source's offset of its block for dest
  recv_off_NN = _exclusive_cumsum(rows_NN, axis=0)  # dest's offset of the block from source
  exchange = lambda operand, out_rows, *sizes: ragged_exchange(
      operand, jnp.zeros((out_rows, D), operand.dtype), *sizes, axis_name=axis, max_rows=M,
      ragged=ragged)
  x_RD = exchange(x_XD, N * M, send_off_NN[me], send_N, recv_off_NN[me], recv_N)
  # Received: source after source, each source's rows sorted by local expert.
  ends_Z = jnp.cumsum(counts_NNL[:, me, :].reshape(-1))  # Z = N * L (source, expert) blocks
  row_R = jnp.arange(N * M)
  block_R = jnp.searchsorted(ends_Z, row_R, side="right")
  y_RD = local_ffn(dispatch, x_RD, block_R % L, row_R < ends_Z[-1], experts)
  y_XD = exchange(y_RD, t * K, recv_off_NN[:, me], recv_N, send_off_NN[:, me], send_N)
  return unsort_combine(y_XD, order_X, valid_X, decision.weight_TK, K), valid_X.reshape(t, K)
