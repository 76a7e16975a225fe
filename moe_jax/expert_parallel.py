"""Expert parallelism: experts sharded over the `expert` mesh axis, tokens exchanged
with all_to_all inside `jax.shard_map`.

Axis letters: T tokens (local to a device inside shard_map), D model dim, E experts,
L experts per device, N devices on the expert axis, C capacity per expert and device.

Each device routes its own tokens, packs them into fixed-size [E, C, D] buffers (slots
past capacity are dropped, in the same order as the einsum dispatcher), sends expert
e's buffer to the device holding e, runs its L local experts on what it received from
all N devices, and sends the results back to be combined. With no slot over capacity
this equals every other dispatcher; with overflow it equals `einsum` with
group_size = tokens per device.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from moe_jax.dispatch import assign_capacity_slots
from moe_jax.experts import ExpertWeights
from moe_jax.routing import RoutingDecision, token_choice_capacity


def expert_parallel_ffn(x_TD: jax.Array, decision: RoutingDecision, experts: ExpertWeights,
                        mesh: Mesh, *, capacity_factor: float, min_capacity: int = 1,
                        expert_axis: str = "expert",
                        token_axes: Sequence[str] = ("data", "fsdp", "expert")):
  """Capacity-mode expert-parallel MoE FFN; returns (y_TD, dropped_fraction)."""
  E = experts.num_experts
  N = mesh.shape[expert_axis]
  if E % N:
    raise ValueError(f"num_experts={E} is not divisible by mesh.{expert_axis}={N}")
  token_axes = tuple(a for a in token_axes if a in mesh.shape)
  shards = 1
  for a in token_axes:
    shards *= mesh.shape[a]
  T, K = decision.expert_index_TK.shape
  if T % shards:
    raise ValueError(f"T={T} tokens do not split over mesh axes {token_axes} ({shards} shards)")
  C = token_choice_capacity(T // shards, K, E, capacity_factor, min_capacity)
  tok = P(token_axes, None)
  w_spec = P(expert_axis, None, None)

  def local(x_TD, index_TK, weight_TK, valid_TK, w_up, w_down, w_gate):
    t, d = x_TD.shape
    local_decision = RoutingDecision(expert_index_TK=index_TK, weight_TK=weight_TK,
                                     mask_TK=valid_TK)
    position_TK, keep_TK = assign_capacity_slots(local_decision, E, t, C)
    slot = jnp.where(keep_TK, position_TK, C)  # C = out of range: dropped
    rows_TKD = jnp.broadcast_to(x_TD[:, None, :], (t, K, d))
    buf_ECD = jnp.zeros((E, C, d), x_TD.dtype).at[index_TK, slot].set(rows_TKD, mode="drop")
    # Expert e lives on device e // L: exchange [N, L, C, D] blocks.
    L = E // N
    recv_NLCD = jax.lax.all_to_all(buf_ECD.reshape(N, L, C, d), expert_axis, 0, 0, tiled=True)
    local_experts = ExpertWeights(w_up, w_down, w_gate, experts.activation)
    y_LXD = local_experts.batched(recv_NLCD.transpose(1, 0, 2, 3).reshape(L, N * C, d))
    y_NLCD = y_LXD.reshape(L, N, C, d).transpose(1, 0, 2, 3)
    back_ECD = jax.lax.all_to_all(y_NLCD, expert_axis, 0, 0, tiled=True).reshape(E, C, d)
    y_TKD = back_ECD.at[index_TK, jnp.minimum(slot, C - 1)].get(mode="clip")
    w_TK = jnp.where(keep_TK, weight_TK, 0.0).astype(x_TD.dtype)
    y_TD = jnp.einsum("TKD,TK->TD", y_TKD, w_TK)
    kept = jax.lax.psum(keep_TK.sum(), token_axes)
    wanted = jax.lax.psum(valid_TK.sum(), token_axes)
    return y_TD, 1.0 - kept / jnp.maximum(wanted, 1)

  fn = jax.shard_map(local, mesh=mesh,
                     in_specs=(tok, tok, tok, tok, w_spec, w_spec,
                               None if experts.w_gate_EDF is None else w_spec),
                     out_specs=(tok, P()))
  return fn(x_TD, decision.expert_index_TK, decision.weight_TK, decision.valid_TK(),
            experts.w_up_EDF, experts.w_down_EFD, experts.w_gate_EDF)
