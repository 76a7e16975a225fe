"""A routed mixture of soft prompts prepended to the input (SMoP).

SMoP (Choi et al., "SMoP: Towards Efficient and Effective Prompt Tuning with Sparse
Mixture-of-Prompts", EMNLP 2023, https://aclanthology.org/2023.emnlp-main.884; the same
idea for CLIP prompts: Du et al., "Mixture of Prompt Learning for Vision Language Models",
arXiv:2409.12011) keeps a pool of E short soft prompts P_e [S, D] and routes each example,
not each token, by its mean-pooled input embedding:
  x_bar = mean over real tokens of x,   p = softmax(x_bar @ W_DE),
  prompt = sum over the k largest p_e of p_e * P_e   (the probabilities unrenormalized, so
  the router gets gradients even at k = 1),
with the load-balancing loss alpha * E * sum_e mean_b(p_e) * f_e (f_e the fraction of
chosen prompts that are e). The prompt is prepended to the sequence; the model strips its
positions before pooling the output.

Axis letters: B batch, S tokens (here the prompt's length), D model dim, E prompts (the
pool's "experts"), K prompts chosen per example.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import validation as V
from moe_jax.nn import losses


@dataclasses.dataclass(frozen=True)
class PromptMixConfig:
  """num_prompts: E, the pool; length: S tokens per prompt; k: prompts mixed per example;
  load_balance_weight: SMoP's alpha (0.01 in the paper's code)."""

  num_prompts: int = 4
  length: int = 4
  k: int = 1
  load_balance_weight: float = 1e-2

  def __post_init__(self):
    V.check_int_range("prompts.num_prompts", self.num_prompts, lo=1)
    V.check_int_range("prompts.length", self.length, lo=1)
    V.check_int_range("prompts.k", self.k, lo=1, hi=self.num_prompts)
    if not (V.is_number(self.load_balance_weight) and self.load_balance_weight >= 0):
      raise ValueError(f"prompts.load_balance_weight={self.load_balance_weight!r} must be a "
                       "number >= 0")

  @classmethod
  def parse(cls, value: Any) -> "PromptMixConfig | None":
    """None, a PromptMixConfig, or a dict of its fields (unknown keys: one line)."""
    if value is None or isinstance(value, cls):
      return value
    if not (isinstance(value, Mapping) or hasattr(value, "items")):
      raise ValueError(f"prompts={value!r} must be None or dict(num_prompts=..., length=..., "
                       "k=..., load_balance_weight=...)")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(dict(value.items())) - known)
    if unknown:
      raise ValueError(f"unknown key(s) {unknown} in prompts; valid keys: {', '.join(sorted(known))}")
    return cls(**dict(value.items()))


class PromptMixture(nn.Module):
  """[B, S_in, D] tokens (+ [B, S_in] mask) -> [B, length, D], each example's mixed prompt.

  Sows the weighted load-balancing loss into "aux_loss"/"prompts" (not during init).
  """

  config: PromptMixConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens_BSD: jax.Array, mask_BS: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    E, D = cfg.num_prompts, tokens_BSD.shape[-1]
    prompts_ESD = self.param("prompts_ESD", nn.initializers.normal(1.0), (E, cfg.length, D),
                             self.param_dtype)
    router_DE = self.param("router_DE", nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal"), (D, E), self.param_dtype)
    x = tokens_BSD.astype(jnp.float32)
    if mask_BS is None:
      pooled_BD = x.mean(axis=1)
    else:
      w_BS = mask_BS.astype(jnp.float32)
      pooled_BD = jnp.einsum("BSD,BS->BD", x, w_BS) / jnp.maximum(w_BS.sum(1), 1.0)[:, None]
    probs_BE = jax.nn.softmax(pooled_BD @ router_DE.astype(jnp.float32), axis=-1)
    weight_BK, index_BK = jax.lax.top_k(probs_BE, cfg.k)
    chosen_BKSD = prompts_ESD.astype(jnp.float32)[index_BK]
    prompt_BSD = jnp.einsum("BK,BKSD->BSD", weight_BK, chosen_BKSD)
    if not self.is_initializing():
      chosen_E = jax.nn.one_hot(index_BK, E, dtype=jnp.float32).sum((0, 1))
      balance = E * jnp.sum(probs_BE.mean(0) * chosen_E / chosen_E.sum())
      self.sow(losses.AUX_LOSS_COLLECTION, "prompts", cfg.load_balance_weight * balance)
    return prompt_BSD.astype(self.dtype)
