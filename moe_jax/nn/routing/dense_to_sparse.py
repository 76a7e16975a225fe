"""EvoMoE's Dense-To-Sparse gate (DTS-Gate): Nie et al., "EvoMoE: An Evolutional
Mixture-of-Experts Training Framework via Dense-To-Sparse Gate", arXiv:2112.14397.

Axis letters: T tokens, D model dim, E experts, K slots per token (K = E here).

The gate is a Gumbel softmax over the experts whose temperature falls during training,
  g_TE = softmax((x W + zeta) / tau),  zeta ~ Gumbel(0, 1) i.i.d. while training,
so it starts dense (a high tau spreads the weight over every expert) and grows sparse;
experts whose g falls below `threshold` are not computed (the token's largest-g
expert always is). After `switch_step` the gate is hard top-1: each token runs only its
argmax expert, weighted by its g. The schedule position is a counter in the
"router_state" collection, advanced once per training call (the train step carries and
checkpoints it, so a resumed run continues the schedule); tau moves linearly in that
counter from tau_max to tau_min over `anneal_steps` calls, then stays at tau_min (the
paper anneals tau from a large to a small value; the linear shape is our choice).
Evaluation (deterministic) uses the current tau and switch without noise and leaves the
counter alone. Every expert is a slot (K = E, static shapes): dropped experts are
masked slots (mask_TK False), which no dispatcher computes.
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


def dts_temperature(calls: jax.Array, tau_max: float, tau_min: float,
                    anneal_steps: int) -> jax.Array:
  """tau after `calls` training calls: linear from tau_max to tau_min over anneal_steps."""
  if anneal_steps == 0:
    return jnp.full((), tau_min, jnp.float32)
  frac = jnp.clip(calls.astype(jnp.float32) / anneal_steps, 0.0, 1.0)
  return tau_max + (tau_min - tau_max) * frac


@ROUTERS.register("dense_to_sparse")
class DenseToSparseRouter(nn.Module):
  """EvoMoE's DTS gate: dense -> sparse Gumbel-softmax routing on a temperature schedule.

  Options:
    tau_max, tau_min: the temperature at the first training call and after annealing.
    anneal_steps: training calls over which tau falls linearly (0: tau_min at once).
    threshold: an expert whose gate weight g is below it is dropped for that token
      (in [0, 1); 0 keeps every expert until the switch).
    switch_step: from this training call on, hard top-1 (None: at anneal_steps).
  The Gumbel noise draws from the "jitter" rng while training (the train step passes
  it). Aux: load_balance_loss (Switch's E * sum_e f_e P_e with f_e the share of the
  computed slots and P_e the mean noise-free softmax(x W)), z_loss, expert_load_E,
  router_entropy, active_experts_per_token (mean computed experts per token) and
  temperature (the tau of this call).
  """

  num_experts: int
  tau_max: float = 2.0
  tau_min: float = 0.3
  anneal_steps: int = 1000
  threshold: float = 0.001
  switch_step: int | None = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    V.check_int_range("num_experts", self.num_experts, lo=1)
    V.check_positive("tau_max", self.tau_max)
    V.check_positive("tau_min", self.tau_min)
    if self.tau_min > self.tau_max:
      raise ValueError(f"tau_min={self.tau_min} must be <= tau_max={self.tau_max} "
                       "(the temperature anneals downwards)")
    V.check_int_range("anneal_steps", self.anneal_steps, lo=0)
    V.check_fraction("threshold", self.threshold)
    if self.switch_step is not None:
      V.check_int_range("switch_step", self.switch_step, lo=0)
    super().__post_init__()

  @property
  def switch_at(self) -> int:
    return self.anneal_steps if self.switch_step is None else self.switch_step

  @nn.compact
  def __call__(self, x_TD: jax.Array, context: Any = None, *, deterministic: bool = True,
               token_mask_T: jax.Array | None = None) -> RoutingDecision:
    del context  # not a conditioned router
    valid_T = check_token_mask(token_mask_T, x_TD)
    logits_TE = router_logits(self, x_TD, self.num_experts, 0.0, deterministic, self.param_dtype)
    if not (self.has_variable(ROUTER_STATE, "calls")
            or self.is_mutable_collection(ROUTER_STATE)):
      raise ValueError("router 'dense_to_sparse' keeps its schedule counter in the "
                       "'router_state' collection: apply with the variables init() returned")
    calls = self.variable(ROUTER_STATE, "calls", lambda: jnp.zeros((), jnp.int32))
    tau = dts_temperature(calls.value, self.tau_max, self.tau_min, self.anneal_steps)
    noisy_TE = logits_TE
    if not deterministic and not self.is_initializing():
      if not self.has_rng("jitter"):
        raise ValueError("router 'dense_to_sparse' while training draws its Gumbel noise from "
                         "the 'jitter' rng: pass rngs={'jitter': key} (or deterministic=True)")
      noisy_TE = logits_TE + jax.random.gumbel(self.make_rng("jitter"), logits_TE.shape,
                                               jnp.float32)
    gate_TE = jax.nn.softmax(noisy_TE / tau, axis=-1)
    top1_TE = jax.nn.one_hot(jnp.argmax(gate_TE, axis=-1), self.num_experts, dtype=bool)
    hard = calls.value >= self.switch_at
    active_TE = jnp.where(hard, top1_TE, (gate_TE >= self.threshold) | top1_TE)
    if valid_T is not None:
      active_TE = active_TE & (valid_T[:, None] > 0)
    if not deterministic and not self.is_initializing() and self.is_mutable_collection(
        ROUTER_STATE):
      calls.value = calls.value + 1

    assigned_TE = active_TE.astype(jnp.float32)
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    aux = {
        "load_balance_loss": losses.load_balance_loss(probs_TE, assigned_TE, valid_T),
        "z_loss": losses.router_z_loss(logits_TE, valid_T),
        "expert_load_E": assigned_TE.sum(0) / jnp.maximum(assigned_TE.sum(), 1.0),
        "dropped_fraction": jnp.zeros((), jnp.float32),
        "router_entropy": losses.router_entropy(probs_TE, valid_T),
        "active_experts_per_token": losses.token_mean(assigned_TE.sum(-1), valid_T),
        "temperature": tau,
    }
    T = x_TD.shape[0]
    return RoutingDecision(
        expert_index_TK=jnp.broadcast_to(jnp.arange(self.num_experts, dtype=jnp.int32),
                                         (T, self.num_experts)),
        weight_TK=jnp.where(active_TE, gate_TE, 0.0),
        mask_TK=active_TE,
        logits_TE=logits_TE,
        aux=aux)
