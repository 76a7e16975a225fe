"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus).

Axis letters: B batch, V vocabulary.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe_jax import validation as V


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 is greedy (argmax); top_k 0 and top_p 1 keep every token."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 32
  stop_tokens: tuple[int, ...] = ()
  seed: int = 0

  def __post_init__(self):
    if not (V.is_number(self.temperature) and self.temperature >= 0):
      raise ValueError(f"temperature={self.temperature!r} must be a number >= 0 (0: greedy)")
    V.check_int_range("top_k", self.top_k, lo=0)
    if not (V.is_number(self.top_p) and 0 < self.top_p <= 1):
      raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
    V.check_int_range("max_new_tokens", self.max_new_tokens, lo=1)


def choose(logits_BV: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """int32 token ids [B] (static `sampling`: one compile per setting)."""
  logits_BV = logits_BV.astype(jnp.float32)
  if sampling.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits_BV, min(sampling.top_k, logits_BV.shape[-1]))[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
  if sampling.top_p < 1:
    # Keep the most likely tokens whose cumulative probability before them is < top_p
    # (so the top token always stays).
    order_BV = jnp.argsort(-logits_BV, axis=-1)
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    before_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1) - jax.nn.softmax(
        sorted_BV, axis=-1)
    drop_sorted_BV = before_BV >= sampling.top_p
    drop_BV = jnp.zeros_like(drop_sorted_BV).at[
        jnp.arange(logits_BV.shape[0])[:, None], order_BV].set(drop_sorted_BV)
    logits_BV = jnp.where(drop_BV, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)
