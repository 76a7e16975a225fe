"""The sparse MoE feed-forward layer: router -> dispatch -> experts -> combine (+ shared).

Axis letters: T tokens, D model dim, E experts.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config import MoEConfig
from moe_jax.nn import losses
from moe_jax.nn.context import Context
from moe_jax.nn.dispatch import CapacityOptions, get_dispatcher
from moe_jax.nn.experts import EXPERTS, FeedForward
from moe_jax.nn.layers import MOE_LAYERS
from moe_jax.nn.routing import make_router
from moe_jax.parallel.expert_parallel import expert_axis_size, expert_parallel_ffn


def drop_metrics(decision, kept_TK: jax.Array, num_experts: int,
                 real_T: jax.Array | None) -> dict[str, jax.Array]:
  """What capacity did to the routing, as separately named metrics.

  dropped_slot_fraction: chosen (valid) slots that did not run / all chosen slots
    (top-k with einsum capacity; 0 for dropless dispatch and for expert choice,
    whose router already enforced capacity).
  unrouted_token_fraction: real tokens that reached no expert at all (expert
    choice: tokens no expert picked; top-k: tokens whose every slot was dropped).
  processed_load_E: each expert's share of the slots that ran, next to the router's
    expert_load_E (its share of the slots requested, before capacity).
  """
  valid_TK = decision.valid_TK()
  kept = kept_TK.astype(jnp.float32)
  processed_E = jnp.einsum("TK,TKE->E", kept,
                           jax.nn.one_hot(decision.expert_index_TK, num_experts, dtype=kept.dtype))
  return {
      "dropped_slot_fraction": 1.0 - kept.sum() / jnp.maximum(valid_TK.sum(), 1),
      "unrouted_token_fraction": 1.0 - losses.token_mean(
          kept_TK.any(-1).astype(jnp.float32), None if real_T is None else real_T > 0),
      "processed_load_E": processed_E / jnp.maximum(kept.sum(), 1.0),
  }


def prune_slots(decision, beta: float, token_mask: jax.Array | None):
  """(decision without the slots whose weight < beta x the token's top weight, the share
  of real tokens' chosen slots pruned). MC-MoE's online dynamic pruning (Huang et al.,
  arXiv:2410.06270): the skipped slots run no expert (masked out of every dispatcher)
  and add nothing; the kept weights are not renormalised."""
  valid_TK = decision.valid_TK()
  w_TK = decision.weight_TK.astype(jnp.float32)
  top_T1 = jnp.max(jnp.where(valid_TK, w_TK, 0.0), axis=-1, keepdims=True)
  keep_TK = valid_TK & (w_TK >= beta * top_T1)
  real_T1 = (jnp.ones_like(top_T1) if token_mask is None
             else token_mask.reshape(-1, 1).astype(jnp.float32))
  chosen = jnp.sum(valid_TK * real_T1)
  pruned = jnp.sum((valid_TK & ~keep_TK) * real_T1) / jnp.maximum(chosen, 1.0)
  # The fused router's precomputed slot positions and counts no longer hold: re-sorted.
  return decision.replace(mask_TK=keep_TK, weight_TK=jnp.where(keep_TK, decision.weight_TK, 0),
                          position_TK=None, counts_E=None), pruned


def routing_record(decision, kept_TK: jax.Array, num_experts: int, lead: tuple[int, ...],
                   token_mask: jax.Array | None, context_T: Context | None
                   ) -> dict[str, jax.Array]:
  """What moe_jax.analysis reads of one call, each with the input's leading shape `lead`
  ([B, S] for a sequence model) so tokens map back to their examples:
  expert_index / weight / valid / kept [..., K] (valid: the slot chose an expert; kept:
  and it ran), probs [..., E'] (softmax of the router logits when the router has them;
  E' > E with null experts), token_valid [...], modality [...] (-1 where the model gave
  none) and the scalar num_experts (under scan over layers every leaf gains a leading
  [repeats] axis; this scalar shows it)."""
  K = decision.expert_index_TK.shape[-1]
  record = {
      "expert_index": decision.expert_index_TK.reshape(*lead, K),
      "weight": decision.weight_TK.astype(jnp.float32).reshape(*lead, K),
      "valid": decision.valid_TK().reshape(*lead, K),
      "kept": kept_TK.reshape(*lead, K),
      "token_valid": (jnp.ones(lead, bool) if token_mask is None
                      else token_mask.astype(bool).reshape(lead)),
      "modality": (jnp.full(lead, -1, jnp.int32)
                   if context_T is None or context_T.modality_id is None
                   else context_T.modality_id.astype(jnp.int32).reshape(lead)),
      "num_experts": jnp.asarray(num_experts, jnp.int32),
  }
  if decision.logits_TE is not None:
    logits = decision.logits_TE.astype(jnp.float32)
    record["probs"] = jax.nn.softmax(logits, axis=-1).reshape(*lead, logits.shape[-1])
  return record


@MOE_LAYERS.register("moe")
class MoELayer(nn.Module):
  """Sparse MoE FFN over inputs of any leading shape [..., D].

  Sows, per call (a tuple entry per call; nothing during init, so init's output holds
  only parameters):
    "aux_loss"/"moe": load_balance_weight * lb + z_loss_weight * z (sum all
      leaves of this collection into the task loss: `losses.sum_aux_losses`).
    "moe_metrics"/"moe": dict of raw losses and router metrics.
  The jitter noise, when configured, draws from the "jitter" rng. `context`
  (one row per example of x's leading axis) reaches the router one row per token.
  `token_mask` ([...], False = padding) keeps padding out of routing, capacity and aux
  losses; padded positions come out 0 (plus shared experts).
  Under a mesh whose `expert` axis is > 1 (`jax.set_mesh`), the experts run
  expert-parallel (`cfg.expert_parallel`; `cfg.dispatch` computes the local experts).
  """

  config: MoEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True, context: Context | None = None,
               token_mask: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    if not isinstance(cfg, MoEConfig):
      raise ValueError(f"MoELayer.config must be a MoEConfig, got {type(cfg).__name__}")
    if x.ndim < 2:
      raise ValueError(f"MoELayer input must be [..., D]; got shape {tuple(x.shape)}")
    D = x.shape[-1]
    stored = self.variables.get("params", {}).get("experts", {}).get("w_up_EDF")
    if stored is not None and stored.shape[1] != D:
      raise ValueError(f"MoE input has model dim D={D} but the expert weights were "
                       f"built for D={stored.shape[1]}")
    if token_mask is not None and token_mask.shape != x.shape[:-1]:
      raise ValueError(f"MoELayer token_mask has shape {tuple(token_mask.shape)}; expected the "
                       f"input's leading shape {tuple(x.shape[:-1])}")
    x_TD = x.reshape(-1, D)
    group_size = x.shape[-2] if cfg.sequence_groups and x.ndim >= 3 else cfg.group_size
    context_T = None if context is None else context.per_token(x_TD.shape[0])
    decision = make_router(cfg, self.param_dtype, group_size,
                           x.shape[-2] if x.ndim >= 3 else None)(
        x_TD, context_T, deterministic=deterministic,
        token_mask_T=None if token_mask is None else token_mask.reshape(-1))
    pruned = None
    if cfg.prune_beta > 0 and deterministic:
      decision, pruned = prune_slots(decision, cfg.prune_beta, token_mask)
    experts = EXPERTS.get(cfg.experts)(cfg.num_experts, cfg.expert_hidden_dim, cfg.activation,
                                       self.dtype, self.param_dtype, name="experts")(D)
    capacity = CapacityOptions(cfg.capacity_factor_for(deterministic), group_size,
                               cfg.min_capacity)
    valid_TK = decision.valid_TK()
    if expert_axis_size() > 1:  # a mesh in context spreads the experts over devices
      y_TD, kept_TK = expert_parallel_ffn(
          x_TD.astype(self.dtype), decision, experts, mode=cfg.expert_parallel,
          local_dispatch=cfg.dispatch, capacity_factor=capacity.capacity_factor,
          min_capacity=cfg.min_capacity)
    else:
      y_TD, dispatch_metrics = get_dispatcher(cfg.dispatch)(x_TD.astype(self.dtype), decision,
                                                            experts, capacity)
      kept_TK = dispatch_metrics.get("kept_TK", valid_TK)  # dropless: every valid slot
    if cfg.num_shared_experts:
      shared_F = (cfg.shared_hidden_dim or cfg.expert_hidden_dim) * cfg.num_shared_experts
      shared_TD = FeedForward(shared_F, cfg.activation, self.dtype, self.param_dtype,
                              name="shared_experts")(x_TD)
      if cfg.shared_expert_gate:  # Qwen2-MoE: a per-token sigmoid gate on the shared path
        w_D1 = self.param("shared_gate_w_D1", nn.initializers.zeros_init(),
                          (x_TD.shape[-1], 1), self.param_dtype)
        shared_TD = shared_TD * jax.nn.sigmoid(x_TD @ w_D1.astype(self.dtype))
      y_TD = y_TD + shared_TD
    metrics = dict(decision.aux)
    metrics.pop("dropped_fraction")  # the router's own view; the two below are explicit
    metrics.update(drop_metrics(decision, kept_TK & valid_TK, cfg.num_experts,
                                None if token_mask is None else token_mask.reshape(-1)))
    if pruned is not None:
      metrics["pruned_slot_fraction"] = pruned
    # Not while initializing: init() then returns parameters only, and passing its whole
    # output back into apply(..., mutable=...) cannot count an aux loss twice. (Values
    # still append per call: a shared encoder run on two modalities sows two of each.)
    if not self.is_initializing():
      if self.is_mutable_collection(losses.ROUTING_COLLECTION):
        self.sow(losses.ROUTING_COLLECTION, "moe",
                 routing_record(decision, kept_TK & valid_TK, cfg.num_experts, x.shape[:-1],
                                token_mask, context_T))
      self.sow(losses.METRICS_COLLECTION, "moe", metrics)
      self.sow(losses.AUX_LOSS_COLLECTION, "moe",
               cfg.load_balance_weight * metrics["load_balance_loss"]
               + cfg.z_loss_weight * metrics["z_loss"])
    return y_TD.reshape(x.shape).astype(self.dtype)

