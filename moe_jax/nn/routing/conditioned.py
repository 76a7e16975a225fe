"""Conditioned routing: experts chosen from what the Context says (task, modality, noise
level, a condition vector), with or without the token.

Axis letters: T tokens, D model dim, E experts, K slots per token, U condition features.

Three gates, all followed by the top-k selection of TopKRouter (its options apply):
  "per_value"            a separate gate per task or modality id: logits = x @ W[id]
                         (M3ViT, task-conditioned MoE, arXiv:2210.14793);
  "token_and_condition"  one gate fed the token and a condition embedding:
                         logits = x @ W_x + u(c) @ W_u (MoDE's noise conditioning,
                         arXiv:2412.12953; Mixture-of-Supernets' architecture codes,
                         arXiv:2306.04845);
  "condition_only"       logits = u(c) @ W_u: routing depends on the condition alone
                         (MoDE), so with `cache` the gate runs once per condition value
                         and every token reuses its value's logits (the expert cache).
u(c) is a learned embedding row for integer ids (task_id, modality_id), sinusoidal
features of noise_level, or condition_BU itself.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import validation as V
from moe_jax.nn.context import Context
from moe_jax.nn.routing.base import ROUTERS, router_logits
from moe_jax.nn.routing.top_k import TopKRouter

GATES = ("per_value", "token_and_condition", "condition_only")
INTEGER_FIELDS = ("task_id", "modality_id")
CONDITIONS = INTEGER_FIELDS + ("noise_level", "condition_BU")


def sinusoidal_features(level_T: jax.Array, dim: int) -> jax.Array:
  """[T] noise levels / timesteps -> [T, dim] sin and cos at geometric frequencies."""
  half = dim // 2
  freq = jnp.exp(-jnp.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
  angle = level_T.astype(jnp.float32)[:, None] * freq[None, :]
  return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


def condition_router_flops(num_tokens: int, num_values: int, cond_dim: int,
                           num_experts: int) -> dict[str, int]:
  """Multiply-add FLOPs of the condition_only gate without and with the expert cache."""
  return {"uncached": 2 * num_tokens * cond_dim * num_experts,
          "cached": 2 * num_values * cond_dim * num_experts}


@ROUTERS.register("conditioned")
class ConditionedRouter(TopKRouter):
  """Top-k routing on a Context field; see the module docstring. Options (beyond top_k's):

  on: the Context field routed on ("task_id", "modality_id", "noise_level",
    "condition_BU"); gate: "per_value", "token_and_condition" or "condition_only";
  num_values: how many ids `on` takes (task_id, modality_id); embed_dim: U, the
    width of the learned id embedding or of the noise-level features;
  cache: condition_only on an id: run the gate once per id and gather (the expert
    cache; equal to running it per token).
  """

  on: str = "task_id"
  gate: str = "per_value"
  num_values: int = 0
  embed_dim: int = 16
  cache: bool = False

  def __post_init__(self):
    V.check_choice("on", self.on, CONDITIONS)
    V.check_choice("gate", self.gate, GATES)
    integer = self.on in INTEGER_FIELDS
    if integer:
      V.check_int_range("num_values", self.num_values, lo=1)
    if self.gate == "per_value" and not integer:
      raise ValueError(f"gate='per_value' needs an id to pick the gate by (on='task_id' or "
                       f"'modality_id'); got on={self.on!r}")
    if self.cache and not (self.gate == "condition_only" and integer):
      raise ValueError("cache=True needs gate='condition_only' on an id (task_id or "
                       f"modality_id): got gate={self.gate!r}, on={self.on!r}")
    V.check_int_range("embed_dim", self.embed_dim, lo=1)
    if self.fused:
      raise ValueError("fused=True is not available for the conditioned router")
    super().__post_init__()

  def _condition(self, context: Any, num_tokens: int) -> jax.Array:
    value = None if context is None else getattr(context, self.on)
    if value is None:
      raise ValueError(f"router 'conditioned' routes on context.{self.on}, which the model did "
                       f"not provide (pass a Context with {self.on} to the stack)")
    if value.shape[0] != num_tokens:
      raise ValueError(f"context.{self.on} has {value.shape[0]} rows for {num_tokens} tokens")
    return value

  def _ids(self, c: jax.Array) -> jax.Array:
    """Integer ids clipped into the tables' range."""
    return jnp.clip(c.astype(jnp.int32), 0, self.num_values - 1)

  def _embedding(self, ids_or_values: jax.Array) -> jax.Array:
    """u(c): [N] ids -> learned rows; [N] noise levels -> sinusoids; [N, U] as given."""
    if self.on in INTEGER_FIELDS:
      table = self.param("condition_table", nn.initializers.normal(1.0),
                         (self.num_values, self.embed_dim), self.param_dtype)
      return jnp.take(table.astype(jnp.float32), self._ids(ids_or_values), axis=0)
    if self.on == "noise_level":
      return sinusoidal_features(ids_or_values, self.embed_dim)
    return ids_or_values.astype(jnp.float32)

  def _condition_logits(self, u_NU: jax.Array) -> jax.Array:
    w = self.param("w_cond_UE", nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                   (u_NU.shape[-1], self.num_experts), self.param_dtype)
    return jnp.einsum("NU,UE->NE", u_NU, w.astype(jnp.float32))

  def _logits(self, x_TD: jax.Array, context: Context | None, deterministic: bool) -> jax.Array:
    T = x_TD.shape[0]
    c = self._condition(context, T)
    if self.gate == "per_value":
      w = self.param("w_per_value_DE",
                     nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                      in_axis=-2, out_axis=-1),
                     (self.num_values, x_TD.shape[-1], self.num_experts), self.param_dtype)
      # Every token against every value's gate, then its own (num_values is small).
      all_TNE = jnp.einsum("TD,NDE->TNE", x_TD.astype(jnp.float32), w.astype(jnp.float32))
      return jnp.take_along_axis(all_TNE, self._ids(c)[:, None, None], axis=1)[:, 0]
    if self.gate == "token_and_condition":
      return (router_logits(self, x_TD, self.num_experts, self.jitter, deterministic,
                            self.param_dtype)
              + self._condition_logits(self._embedding(c)))
    if self.cache:  # one gate evaluation per id, gathered by every token
      per_value_NE = self._condition_logits(self._embedding(jnp.arange(self.num_values)))
      return jnp.take(per_value_NE, self._ids(c), axis=0)
    return self._condition_logits(self._embedding(c))
