"""Token-choice top-k routers: Shazeer et al. 2017 (arXiv:1701.06538), Switch
(arXiv:2101.03961), DeepSeek-V3's sigmoid, group-limited variant (arXiv:2412.19437), and
AdaMoE's null experts (arXiv:2406.13233).

Axis letters: T tokens, D model dim, E experts, K slots per token, G expert groups.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import validation as V
from moe_jax.nn import losses
from moe_jax.nn.routing.base import (ROUTER_STATE, ROUTERS, RoutingDecision, check_token_mask,
                                     router_logits)

SCORES = ("softmax", "sigmoid")


def group_limited_mask(select_TE: jax.Array, n_group: int, topk_group: int) -> jax.Array:
  """DeepSeek-V3 node-limited routing (arXiv:2412.19437, sec. 2.1.2): experts split into
  n_group equal groups; a group's score is the sum of its two best selection scores;
  each token keeps the topk_group best groups. Returns bool [T, E] of allowed experts."""
  T, E = select_TE.shape
  select_TGE = select_TE.reshape(T, n_group, E // n_group)
  best = min(2, E // n_group)
  group_score_TG = jax.lax.top_k(select_TGE, best)[0].sum(-1)
  _, keep_group = jax.lax.top_k(group_score_TG, topk_group)
  keep_TG = jnp.zeros((T, n_group), bool).at[jnp.arange(T)[:, None], keep_group].set(True)
  return jnp.repeat(keep_TG, E // n_group, axis=1)


@ROUTERS.register("top_k")
class TopKRouter(nn.Module):
  """Token choice: score every expert, then each token takes its top-k.

  Options:
    k: slots per token.
    score: "softmax" over experts (Switch, Mixtral, Qwen) or an independent
      "sigmoid" per expert (DeepSeek-V3).
    renormalize: rescale the k chosen scores to sum to 1 (HF's norm_topk_prob),
      never for k=1: p/p = 1 would cut the router off from the task gradient, so a
      single slot is gated by its score as in Switch.
    routed_scaling_factor: multiplies the combine weights (DeepSeek-V3: 2.5).
    n_group, topk_group: group-limited routing; experts in n_group equal groups,
      only the topk_group groups with the largest sum of their top-2 scores are
      eligible (1, 1: all experts).
    balance_count, balance_scope: the load-balance loss variant (nn/losses.py
      balance_loss): count "slots" (all T*k assignments), "top1" (Switch) or "hf"
      (Hugging Face Mixtral/Qwen: k x slots); scope "batch" (every token of the call:
      the global batch under jit), "group" (per routing group of MoEConfig.group_size
      tokens, averaged: the micro-batch loss of frameworks that compute it per device)
      or "sequence" (per sequence, averaged: DeepSeek-V3's sequence-wise loss; needs a
      [B, S, D] input).
    batch_priority: `priority_T` = each token's top score, so capacity-limited
      dispatch keeps confident tokens first (V-MoE, arXiv:2106.05974).
    jitter: router inputs times U(1-jitter, 1+jitter) while training (rng "jitter").
    bias_update_rate: aux-loss-free load balancing (DeepSeek-V3, arXiv:2412.19437
      sec. 2.1.2; Wang et al., arXiv:2408.15664) when > 0: a per-expert bias b_E,
      in the "router_state" collection, is added to the scores for choosing
      experts only (never to the combine weights); after each training call,
      b_e += rate * sign(mean load - load_e) over this call's tokens. Pass
      mutable=["router_state"] to apply it (the train step does).
    null_experts: AdaMoE (Zeng et al., "AdaMoE: Token-Adaptive Routing with Null
      Experts for Mixture-of-Experts Language Models", arXiv:2406.13233) when m > 0:
      m null experts join the candidates (logits [T, E+m]: w_DE for the real experts,
      w_null_DE for the nulls, on the un-jittered input), the scores and top-k run
      over all E+m (raise k accordingly, e.g. top-2 over 8 -> top-4 over 8+m), and a
      slot that picks a null is unused (mask_TK False, weight 0): no dispatcher
      computes it, so a token runs between 0 and k real experts. With `renormalize`
      the real slots' scores are rescaled to sum to 1 over the real slots a token
      chose (the authors' code; a token with only nulls gets 0). The balance loss
      counts the nulls as one bucket, L = (E+m) * (sum_{e<E} f_e P_e
      + fbar * sum_{j>=E} P_j), fbar = (1/m) sum_{j>=E} f_j (f: shares of the T*k
      slots, P: mean scores, both over E+m), which steers the mean null share rather
      than any one null's; expert_load_E covers the E real experts (shares of the real
      slots) and aux["real_experts_per_token"] is the mean number of real slots.
    fused: softmax -> top-k -> renormalise in the kernels_pallas router kernel,
      which also returns each slot's position in its expert group (the tile layout
      then needs no sort); softmax scores, one group only.
  Aux losses: the load-balance loss and entropy read the scores normalised to sum
  to 1 per token (softmax: the probabilities themselves); the z-loss the logits.
  """

  num_experts: int
  k: int = 2
  score: str = "softmax"
  renormalize: bool = True
  routed_scaling_factor: float = 1.0
  n_group: int = 1
  topk_group: int = 1
  bias_update_rate: float = 0.0
  balance_count: str = "slots"
  balance_scope: str = "batch"
  batch_priority: bool = False
  jitter: float = 0.0
  fused: bool = False
  null_experts: int = 0
  group_size: int | None = None
  sequence_length: int | None = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    V.check_int_range("num_experts", self.num_experts, lo=1)
    V.check_int_range("null_experts", self.null_experts, lo=0)
    V.check_int_range("k", self.k, lo=1, hi=self.num_experts + self.null_experts)
    V.check_choice("score", self.score, SCORES)
    V.check_positive("routed_scaling_factor", self.routed_scaling_factor)
    V.check_int_range("n_group", self.n_group, lo=1, hi=self.num_experts)
    if self.num_experts % self.n_group:
      raise ValueError(f"n_group={self.n_group} does not divide num_experts={self.num_experts}")
    V.check_int_range("topk_group", self.topk_group, lo=1, hi=self.n_group)
    per_group = self.num_experts // self.n_group
    if self.null_experts and (self.n_group > 1 or self.bias_update_rate or self.fused):
      raise ValueError(f"null_experts={self.null_experts} needs n_group=1, no bias balancing "
                       f"and fused=False (got n_group={self.n_group}, bias_update_rate="
                       f"{self.bias_update_rate}, fused={self.fused})")
    if self.k > self.topk_group * per_group + self.null_experts:
      raise ValueError(f"k={self.k} is more than the {self.topk_group * per_group} experts in "
                       f"the kept groups (topk_group={self.topk_group} x {per_group} per group)")
    V.check_fraction("jitter", self.jitter)
    V.check_choice("balance_count", self.balance_count, losses.BALANCE_COUNTS)
    V.check_choice("balance_scope", self.balance_scope, losses.BALANCE_SCOPES)
    if self.bias_update_rate < 0:
      raise ValueError(f"bias_update_rate={self.bias_update_rate!r} must be >= 0")
    if self.fused and (self.score != "softmax" or self.n_group > 1 or self.bias_update_rate):
      raise ValueError("fused=True runs the softmax top-k kernel: it needs score='softmax', "
                       f"n_group=1 and no bias balancing (got score={self.score!r}, "
                       f"n_group={self.n_group}, bias_update_rate={self.bias_update_rate})")
    super().__post_init__()

  @nn.compact
  def __call__(self, x_TD: jax.Array, context: Any = None, *, deterministic: bool = True,
               token_mask_T: jax.Array | None = None) -> RoutingDecision:
    valid_T = check_token_mask(token_mask_T, x_TD)
    logits_TE = self._logits(x_TD, context, deterministic)
    if self.null_experts:  # AdaMoE: m more candidates, always after the E real experts
      w_null_DE = self.param(
          "w_null_DE", nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
          (x_TD.shape[-1], self.null_experts), self.param_dtype)
      null_TE = jnp.einsum("TD,DE->TE", x_TD.astype(jnp.float32), w_null_DE.astype(jnp.float32))
      logits_TE = jnp.concatenate([logits_TE, null_TE], axis=-1)
    return self._decide(logits_TE, valid_T, deterministic)

  def _logits(self, x_TD: jax.Array, context: Any, deterministic: bool) -> jax.Array:
    """float32 [T, E] router logits; subclasses (conditioned routers) override this."""
    del context  # not a conditioned router
    return router_logits(self, x_TD, self.num_experts, self.jitter, deterministic,
                         self.param_dtype)

  def _decide(self, logits_TE: jax.Array, valid_T: jax.Array | None,
              deterministic: bool) -> RoutingDecision:
    """Scores -> (group-limited, biased) top-k -> weights, aux losses and router state."""
    if self.score == "softmax":
      scores_TE = probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    else:
      scores_TE = jax.nn.sigmoid(logits_TE)
      probs_TE = scores_TE / jnp.sum(scores_TE, axis=-1, keepdims=True)
    renormalize = self.renormalize and self.k > 1
    bias = None
    if self.bias_update_rate > 0:
      if not (self.has_variable(ROUTER_STATE, "bias_E")
              or self.is_mutable_collection(ROUTER_STATE)):
        raise ValueError("bias_update_rate > 0 keeps its bias in the 'router_state' collection: "
                         "apply with the variables init() returned (params and router_state)")
      bias = self.variable(ROUTER_STATE, "bias_E", jnp.zeros, (self.num_experts,), jnp.float32)
    position_TK = counts_E = None
    if self.fused:
      # pylint: disable-next=import-outside-toplevel
      from kernels_pallas.router import fused_top_k_router
      index_TK, weight_TK, position_TK, counts_E = fused_top_k_router(
          logits_TE, k=self.k, renormalize=renormalize)
    else:
      select_TE = scores_TE
      if bias is not None:  # for choosing only; weights below come from the scores
        select_TE = select_TE + bias.value[None, :]
      if self.n_group > 1:
        allowed_TE = group_limited_mask(select_TE, self.n_group, self.topk_group)
        select_TE = jnp.where(allowed_TE, select_TE, -jnp.inf)
      _, index_TK = jax.lax.top_k(select_TE, self.k)
      weight_TK = jnp.take_along_axis(scores_TE, index_TK, axis=-1)
      real_TK = index_TK < self.num_experts  # AdaMoE: False on null slots
      if self.null_experts:
        weight_TK = jnp.where(real_TK, weight_TK, 0.0)
      if renormalize:
        weight_TK = weight_TK / jnp.maximum(jnp.sum(weight_TK, axis=-1, keepdims=True), 1e-30)
    if self.routed_scaling_factor != 1.0:
      weight_TK = weight_TK * self.routed_scaling_factor
    # one_hot of a null index (>= E) is all zeros: real experts only.
    assigned_TE = jax.nn.one_hot(index_TK, self.num_experts, dtype=jnp.float32).sum(1)
    mask_TK = None
    if valid_T is not None:
      assigned_TE = assigned_TE * valid_T[:, None]
      mask_TK = jnp.broadcast_to(valid_T[:, None] > 0, index_TK.shape)
      position_TK = counts_E = None  # the kernel's layout counted padding; dispatch re-sorts
    if self.null_experts:  # null slots unused; their index points at a real expert (0)
      mask_TK = real_TK if mask_TK is None else mask_TK & real_TK
      index_TK = jnp.where(real_TK, index_TK, 0)
    if (bias is not None and not deterministic and not self.is_initializing()
        and self.is_mutable_collection(ROUTER_STATE)):
      load_E = assigned_TE.sum(0)
      bias.value = bias.value + self.bias_update_rate * jnp.sign(load_E.mean() - load_E)
    if self.balance_scope == "sequence" and self.sequence_length is None:
      raise ValueError("balance_scope='sequence' needs a [batch, seq, d_model] input to the "
                       "MoE layer (got tokens only)")
    scope_size = {"batch": None, "sequence": self.sequence_length,
                  "group": self.group_size}[self.balance_scope]
    if scope_size is not None and logits_TE.shape[0] % scope_size:
      raise ValueError(f"balance_scope={self.balance_scope!r}: {scope_size} tokens per "
                       f"{self.balance_scope} do not divide the {logits_TE.shape[0]} tokens")
    # Every null slot counted in column E: the loss averages the null columns anyway.
    balance_index_TK = (jnp.where(real_TK, index_TK, self.num_experts) if self.null_experts
                        else index_TK)
    balance = losses.balance_loss(probs_TE, balance_index_TK, valid_T, count=self.balance_count,
                                  group_size=scope_size, null_experts=self.null_experts)
    aux = {
        "load_balance_loss": balance,
        "z_loss": losses.router_z_loss(logits_TE, valid_T),
        "expert_load_E": (losses.token_mean(assigned_TE, valid_T) / self.k
                          if not self.null_experts else
                          assigned_TE.sum(0) / jnp.maximum(assigned_TE.sum(), 1.0)),
        "dropped_fraction": jnp.zeros((), jnp.float32),  # the dispatcher may overwrite
        "router_entropy": losses.router_entropy(probs_TE, valid_T),
    }
    if self.null_experts:
      aux["real_experts_per_token"] = losses.token_mean(assigned_TE.sum(-1), valid_T)
    return RoutingDecision(
        expert_index_TK=index_TK.astype(jnp.int32),
        weight_TK=weight_TK,
        mask_TK=mask_TK,
        priority_T=jnp.max(scores_TE, axis=-1) if self.batch_priority else None,
        logits_TE=logits_TE,
        aux=aux,
        position_TK=position_TK,
        counts_E=counts_E)
