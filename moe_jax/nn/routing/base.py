"""Routing: the decision every router returns, the router registry and shared helpers.

Axis letters: T tokens, D model dim, E experts, K slots per token,
G groups, S tokens per group, C capacity per expert and group.

Every router is a Linen module registered under a name (`@ROUTERS.register("top_k")`),
called as `router(x_TD, context=None, *, deterministic, token_mask_T=None)
-> RoutingDecision`, and computes its logits in float32 whatever the input dtype.
Its dataclass fields, minus the ones the layer fills in (LAYER_FIELDS), are its
options: `MoEConfig(router=dict(name="top_k", k=2))`. Tokens where `token_mask_T`
is False (padding) get no expert, take no capacity and are left out of the aux
losses and metrics. `context` (nn/context.py, one row per token) is what a
conditioned router may route on; the others ignore it.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import validation as V
from moe_jax.registry import Registry

ROUTERS = Registry("router", package="moe_jax.nn.routing")
# Non-trainable routing state (DeepSeek-V3's balancing bias, ...): a Flax collection the
# router updates in the forward pass while training; the train step keeps the new value
# in TrainState.router_state (the optimizer never sees it), checkpoints save it.
ROUTER_STATE = "router_state"

# Filled in by the MoE layer from MoEConfig, not router options the user sets.
LAYER_FIELDS = ("num_experts", "capacity_factor", "eval_capacity_factor", "group_size",
                "min_capacity", "sequence_length", "param_dtype", "parent", "name")


@flax.struct.dataclass
class RoutingDecision:
  """What a router decided, in a form every dispatcher understands.

  Attributes:
    expert_index_TK: int32 expert of each of a token's K slots.
    weight_TK: float32 combine weight of each slot (0 for unused slots).
    mask_TK: bool, False where a slot is unused (expert choice); None = all used.
    priority_T: float32, higher fills capacity first (batch priority routing);
      None = token order.
    logits_TE: float32 router logits (the layer sows them for analysis when asked).
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


STEERING_COLLECTION = "steering"  # {..router path..: {"logit_bias_E": [E]}}, never trained


def router_logits(module: nn.Module, x_TD: jax.Array, num_experts: int, jitter: float,
                   deterministic: bool, param_dtype: Any) -> jax.Array:
  """float32 logits x @ W, with multiplicative input jitter while training."""
  V.check_rank("router input x_TD", x_TD, 2, "tokens, model dim")
  x_TD = x_TD.astype(jnp.float32)
  if jitter > 0 and not deterministic:
    if not module.has_rng("jitter"):
      raise ValueError(f"router jitter={jitter} while training needs a 'jitter' rng: pass "
                       "rngs={'jitter': key} to apply (or deterministic=True)")
    noise = jax.random.uniform(module.make_rng("jitter"), x_TD.shape, jnp.float32,
                               1.0 - jitter, 1.0 + jitter)
    x_TD = x_TD * noise
  w_DE = module.param("w_DE", nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                      (x_TD.shape[-1], num_experts), param_dtype)
  logits_TE = jnp.einsum("TD,DE->TE", x_TD, w_DE.astype(jnp.float32))
  # Steering at inference (moe_jax.analysis.steering): a per-expert bias on the logits,
  # before every router's selection, when the caller passes the "steering" collection.
  if module.has_variable(STEERING_COLLECTION, "logit_bias_E"):
    bias_E = module.get_variable(STEERING_COLLECTION, "logit_bias_E").astype(jnp.float32)
    logits_TE = logits_TE + bias_E[None, :]
  return logits_TE


def check_token_mask(token_mask_T: jax.Array | None, x_TD: jax.Array) -> jax.Array | None:
  """The padding mask as float32 1/0 per token (None = every token is real)."""
  if token_mask_T is None:
    return None
  if token_mask_T.shape != x_TD.shape[:1]:
    raise ValueError(f"token_mask_T has shape {tuple(token_mask_T.shape)}; expected "
                     f"[tokens]=({x_TD.shape[0]},)")
  return token_mask_T.astype(bool).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class RouterSpec:
  """A router's registered name and its options (hashable: configs are static)."""

  name: str
  options: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def parse(cls, spec: "str | Mapping[str, Any] | RouterSpec", kind: str = "router"
            ) -> "RouterSpec":
    """`kind` names the config field in errors ("router", "layer": the same spec shape)."""
    if isinstance(spec, RouterSpec):
      return spec
    if isinstance(spec, str):
      return cls(spec)
    if isinstance(spec, Mapping) or hasattr(spec, "items"):  # dict, ConfigDict
      opts = dict(spec.items())
      if "name" not in opts:
        names = ROUTERS.names() if kind == "router" else ()
        raise ValueError(f"{kind}={opts!r} needs a 'name'" + (
            f" (registered: {', '.join(repr(n) for n in names)})" if names else ""))
      name = opts.pop("name")
      return cls(name, tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                    for k, v in opts.items())))
    raise ValueError(f"{kind} must be a name or dict(name=..., **options); got {spec!r}")

  def kwargs(self) -> dict[str, Any]:
    return dict(self.options)

  def get(self, key: str, default: Any = None) -> Any:
    return self.kwargs().get(key, default)


def router_options(router_cls) -> tuple[str, ...]:
  """The fields a user may set for `router_cls` (all but the layer-filled ones)."""
  return tuple(f.name for f in dataclasses.fields(router_cls) if f.name not in LAYER_FIELDS)


def check_router_spec(spec: RouterSpec, num_experts: int) -> None:
  """Unknown options and bad values fail here, at config build, in one line."""
  router_cls = ROUTERS.get(spec.name)
  allowed = router_options(router_cls)
  unknown = sorted(set(spec.kwargs()) - set(allowed))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for router {spec.name!r}; valid: "
                     f"{', '.join(allowed) or '(none)'}")
  router_cls(num_experts=num_experts, **spec.kwargs())  # runs the router's own checks


def make_router(cfg, param_dtype: Any = jnp.float32, group_size: int | None = None,
                sequence_length: int | None = None) -> nn.Module:
  """The router `cfg.router` names, with its options and the layer's fields.

  `group_size` (tokens per routing group the layer resolved) overrides cfg.group_size;
  `sequence_length` is S of a [..., S, D] input (None for [T, D]).
  """
  spec = RouterSpec.parse(cfg.router)
  router_cls = ROUTERS.get(spec.name)
  layer = dict(num_experts=cfg.num_experts, capacity_factor=cfg.capacity_factor,
               eval_capacity_factor=cfg.eval_capacity_factor,
               group_size=group_size or cfg.group_size, min_capacity=cfg.min_capacity,
               sequence_length=sequence_length, param_dtype=param_dtype)
  fields = {f.name for f in dataclasses.fields(router_cls)}
  return router_cls(**{k: v for k, v in layer.items() if k in fields}, **spec.kwargs(),
                    name="router")


def token_choice_capacity(group_size: int, k: int, num_experts: int, capacity_factor: float,
                          min_capacity: int = 1) -> int:
  """C = ceil(capacity_factor * S * k / E), clipped to [min_capacity, S].

  The ceiling ignores float noise below 1e-9 (1.1 * 10 / 11 is 1.0000000000000002
  in floats, and means 1).
  """
  c = math.ceil(capacity_factor * group_size * k / num_experts - 1e-9)
  return min(max(c, min_capacity, 1), group_size)
