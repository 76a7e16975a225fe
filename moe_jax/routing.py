"""Routers: which experts see which tokens, with what weight.

Axis letters: T tokens, D model dim, E experts, K slots per token,
G groups, S tokens per group, C capacity per expert and group.

Every router is a Linen module called as
`router(x_TD, *, condition=None, deterministic, token_mask_T=None) -> RoutingDecision`
and computes its logits in float32 whatever the input dtype. Tokens where
`token_mask_T` is False (padding) get no expert, take no capacity and are left
out of the aux losses and metrics. Token-choice top-k gives every
token K slots; expert choice gives every expert C tokens per group, so a token
may receive 0..E experts (K = E slots, unused ones masked out).
"""
from __future__ import annotations

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import losses
from moe_jax import validation as V
from moe_jax.config import ROUTERS


@flax.struct.dataclass
class RoutingDecision:
  """What a router decided, in a form every dispatcher understands.

  Attributes:
    expert_index_TK: int32 expert of each of a token's K slots.
    weight_TK: float32 combine weight of each slot (0 for unused slots).
    mask_TK: bool, False where a slot is unused (expert choice); None = all used.
    priority_T: float32, higher fills capacity first (batch priority routing);
      None = token order.
    logits_TE: float32 router logits, kept for analysis and steering.
    aux: scalar losses and metrics (load_balance_loss, z_loss, expert_load_E,
      dropped_fraction, router_entropy).
    position_TK: int32 index of each slot inside its expert's group, slots taken
      in token-major order; set by the fused router kernel so tile-layout
      dispatchers skip their sort. None = the dispatcher sorts.
    counts_E: int32 slots per expert, alongside position_TK.
    capacity: static per-group capacity the router already enforced (expert
      choice), or None when the dispatcher decides.
    group_size: static tokens per group used by the router, or None.
  """

  expert_index_TK: jax.Array
  weight_TK: jax.Array
  mask_TK: jax.Array | None = None
  priority_T: jax.Array | None = None
  logits_TE: jax.Array | None = None
  aux: dict[str, jax.Array] = flax.struct.field(default_factory=dict)
  position_TK: jax.Array | None = None
  counts_E: jax.Array | None = None
  capacity: int | None = flax.struct.field(pytree_node=False, default=None)
  group_size: int | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def num_tokens(self) -> int:
    return self.expert_index_TK.shape[0]

  def valid_TK(self) -> jax.Array:
    if self.mask_TK is None:
      return jnp.ones(self.expert_index_TK.shape, bool)
    return self.mask_TK

  def gates_TE(self, num_experts: int) -> jax.Array:
    """Dense [T, E] combine weights (0 where a token does not use an expert)."""
    w_TK = jnp.where(self.valid_TK(), self.weight_TK, 0.0)
    onehot_TKE = jax.nn.one_hot(self.expert_index_TK, num_experts, dtype=w_TK.dtype)
    return jnp.einsum("TKE,TK->TE", onehot_TKE, w_TK)


def resolve_group_size(num_tokens: int, group_size: int | None) -> int:
  """Tokens per group; the whole call is one group when group_size is None."""
  if group_size is None:
    return num_tokens
  if num_tokens % group_size:
    raise ValueError(f"group_size={group_size} does not divide the number of tokens "
                     f"T={num_tokens}; pick a divisor of T or group_size=None")
  return group_size


def _router_logits(module: nn.Module, x_TD: jax.Array, num_experts: int, jitter: float,
                   deterministic: bool, param_dtype: Any) -> jax.Array:
  """float32 logits x @ W, with multiplicative input jitter while training."""
  V.check_rank("router input x_TD", x_TD, 2, "tokens, model dim")
  x_TD = x_TD.astype(jnp.float32)
  if jitter > 0 and not deterministic:
    noise = jax.random.uniform(module.make_rng("jitter"), x_TD.shape, jnp.float32,
                               1.0 - jitter, 1.0 + jitter)
    x_TD = x_TD * noise
  w_DE = module.param("w_DE", nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                      (x_TD.shape[-1], num_experts), param_dtype)
  return jnp.einsum("TD,DE->TE", x_TD, w_DE.astype(jnp.float32))


def _check_token_mask(token_mask_T: jax.Array | None, x_TD: jax.Array) -> jax.Array | None:
  """The padding mask as float32 1/0 per token (None = every token is real)."""
  if token_mask_T is None:
    return None
  if token_mask_T.shape != x_TD.shape[:1]:
    raise ValueError(f"token_mask_T has shape {tuple(token_mask_T.shape)}; expected "
                     f"[tokens]=({x_TD.shape[0]},)")
  return token_mask_T.astype(bool).astype(jnp.float32)


def _reject_condition(name: str, condition: Any) -> None:
  if condition is not None:
    raise ValueError(f"{name} does not take a condition; use a conditional router")


class TopKRouter(nn.Module):
  """Token choice: softmax over experts, then each token takes its top-k.

  `weight_TK` are the softmax probabilities of the chosen experts, rescaled to
  sum to 1 when `renormalize`. With `batch_priority`, `priority_T` is each
  token's top weight so capacity-limited dispatch keeps confident tokens first.
  With `fused`, softmax -> top-k -> renormalise runs in the kernels_pallas router
  kernel, which also returns each slot's position in its expert group (the tile
  layout then needs no sort); the logits and aux losses stay in XLA.
  """

  num_experts: int
  k: int = 1
  renormalize: bool = True
  batch_priority: bool = False
  jitter: float = 0.0
  fused: bool = False
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_TD: jax.Array, *, condition: Any = None, deterministic: bool = True,
               token_mask_T: jax.Array | None = None) -> RoutingDecision:
    V.check_int_range("num_experts", self.num_experts, lo=1)
    V.check_int_range("k", self.k, lo=1, hi=self.num_experts)
    valid_T = _check_token_mask(token_mask_T, x_TD)
    _reject_condition("TopKRouter", condition)
    logits_TE = _router_logits(self, x_TD, self.num_experts, self.jitter, deterministic,
                               self.param_dtype)
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    position_TK = counts_E = None
    if self.fused:
      from kernels_pallas.router import fused_top_k_router  # pylint: disable=import-outside-toplevel
      index_TK, weight_TK, position_TK, counts_E = fused_top_k_router(
          logits_TE, k=self.k, renormalize=self.renormalize)
    else:
      weight_TK, index_TK = jax.lax.top_k(probs_TE, self.k)
      if self.renormalize:
        weight_TK = weight_TK / jnp.sum(weight_TK, axis=-1, keepdims=True)
    assigned_TE = jax.nn.one_hot(index_TK, self.num_experts, dtype=jnp.float32).sum(1)
    mask_TK = None
    if valid_T is not None:
      assigned_TE = assigned_TE * valid_T[:, None]
      mask_TK = jnp.broadcast_to(valid_T[:, None], index_TK.shape)
      position_TK = counts_E = None  # the kernel's layout counted padding; dispatch re-sorts
    aux = {
        "load_balance_loss": losses.load_balance_loss(probs_TE, assigned_TE, valid_T),
        "z_loss": losses.router_z_loss(logits_TE, valid_T),
        "expert_load_E": losses.token_mean(assigned_TE, valid_T) / self.k,
        "dropped_fraction": jnp.zeros((), jnp.float32),  # the dispatcher may overwrite
        "router_entropy": losses.router_entropy(probs_TE, valid_T),
    }
    return RoutingDecision(
        expert_index_TK=index_TK.astype(jnp.int32),
        weight_TK=weight_TK,
        mask_TK=mask_TK,
        priority_T=weight_TK[:, 0] if self.batch_priority else None,
        logits_TE=logits_TE,
        aux=aux,
        position_TK=position_TK,
        counts_E=counts_E)


def expert_choice_capacity(group_size: int, num_experts: int, capacity_factor: float,
                           min_capacity: int = 1) -> int:
  """C = round(capacity_factor * S / E), clipped to [max(min_capacity, 1), S]."""
  c = int(round(capacity_factor * group_size / num_experts))
  return min(max(c, min_capacity, 1), group_size)


class ExpertChoiceRouter(nn.Module):
  """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens per group.

  Scores are softmax over experts per token; expert e keeps the C tokens of each
  group with the highest score for e and combines with that score. Load is
  perfectly balanced by construction, so `load_balance_loss` is 0; a token may
  get 0..E experts and `dropped_fraction` is the share of tokens with none.
  With a padding mask, C is counted from each group's real tokens,
  round(capacity_factor * real / E) clipped to [min_capacity, real], so padding
  a sequence further changes nothing; `capacity` stays the padded-size bound.
  Note: a token's experts depend on the other tokens of its group, so this
  router is not causal.
  """

  num_experts: int
  capacity_factor: float = 1.0
  eval_capacity_factor: float | None = None
  group_size: int | None = None
  min_capacity: int = 1
  jitter: float = 0.0
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_TD: jax.Array, *, condition: Any = None, deterministic: bool = True,
               token_mask_T: jax.Array | None = None) -> RoutingDecision:
    V.check_int_range("num_experts", self.num_experts, lo=1)
    V.check_positive("capacity_factor", self.capacity_factor)
    _reject_condition("ExpertChoiceRouter", condition)
    valid_T = _check_token_mask(token_mask_T, x_TD)
    num_tokens, E = x_TD.shape[0], self.num_experts
    S = resolve_group_size(num_tokens, self.group_size)
    G = num_tokens // S
    cf = self.capacity_factor
    if deterministic and self.eval_capacity_factor is not None:
      cf = self.eval_capacity_factor
    C = expert_choice_capacity(S, E, cf, self.min_capacity)

    logits_TE = _router_logits(self, x_TD, E, self.jitter, deterministic, self.param_dtype)
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    scores_TE = probs_TE if valid_T is None else jnp.where(valid_T[:, None] > 0, probs_TE, -1.0)
    scores_GES = scores_TE.reshape(G, S, E).transpose(0, 2, 1)
    gate_GEC, token_GEC = jax.lax.top_k(scores_GES, C)
    keep_GEC = jnp.ones(gate_GEC.shape, bool)
    if valid_T is not None:  # padding ranks last; capacity from each group's real tokens
      real_G = valid_T.reshape(G, S).sum(1)
      cap_G = jnp.clip(jnp.round(cf * real_G / E), max(self.min_capacity, 1), C)
      cap_G = jnp.minimum(cap_G, real_G)
      keep_GEC = (jnp.arange(C)[None, None, :] < cap_G[:, None, None]) & (gate_GEC >= 0)
    # Scatter the (expert, slot) picks back to a [G, S, E] table of weights.
    g_GEC = jnp.arange(G)[:, None, None] + jnp.zeros_like(token_GEC)
    e_GEC = jnp.arange(E)[None, :, None] + jnp.zeros_like(token_GEC)
    weight_GSE = jnp.zeros((G, S, E), jnp.float32).at[g_GEC, token_GEC, e_GEC].set(
        jnp.where(keep_GEC, gate_GEC, 0.0))
    mask_GSE = jnp.zeros((G, S, E), bool).at[g_GEC, token_GEC, e_GEC].set(keep_GEC)
    mask_TE = mask_GSE.reshape(num_tokens, E)
    assigned_TE = mask_TE.astype(jnp.float32)
    routed_T = mask_TE.any(-1).astype(jnp.float32)
    aux = {
        "load_balance_loss": jnp.zeros((), jnp.float32),
        "z_loss": losses.router_z_loss(logits_TE, valid_T),
        "expert_load_E": assigned_TE.sum(0) / jnp.maximum(assigned_TE.sum(), 1.0),
        "dropped_fraction": 1.0 - losses.token_mean(routed_T, valid_T),
        "router_entropy": losses.router_entropy(probs_TE, valid_T),
    }
    index_TK = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (num_tokens, E))
    return RoutingDecision(
        expert_index_TK=index_TK,
        weight_TK=weight_GSE.reshape(num_tokens, E),
        mask_TK=mask_TE,
        logits_TE=logits_TE,
        aux=aux,
        capacity=C,
        group_size=S)


def make_router(cfg, param_dtype: Any = jnp.float32, group_size: int | None = None) -> nn.Module:
  """The router a MoEConfig asks for; `group_size` overrides cfg.group_size."""
  if cfg.router == "top_k":
    return TopKRouter(num_experts=cfg.num_experts, k=cfg.k, renormalize=cfg.renormalize,
                      batch_priority=cfg.batch_priority, jitter=cfg.jitter,
                      fused=cfg.fused_router, param_dtype=param_dtype, name="router")
  if cfg.router == "expert_choice":
    return ExpertChoiceRouter(num_experts=cfg.num_experts, capacity_factor=cfg.capacity_factor,
                              eval_capacity_factor=cfg.eval_capacity_factor,
                              group_size=group_size or cfg.group_size,
                              min_capacity=cfg.min_capacity,
                              jitter=cfg.jitter, param_dtype=param_dtype, name="router")
  V.check_choice("router", cfg.router, ROUTERS)


def token_choice_capacity(group_size: int, k: int, num_experts: int, capacity_factor: float,
                          min_capacity: int = 1) -> int:
  """C = ceil(capacity_factor * S * k / E), clipped to [min_capacity, S].

  The ceiling ignores float noise below 1e-9 (1.1 * 10 / 11 is 1.0000000000000002
  in floats, and means 1).
  """
  c = math.ceil(capacity_factor * group_size * k / num_experts - 1e-9)
  return min(max(c, min_capacity, 1), group_size)
