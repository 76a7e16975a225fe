"""Batched generation with a KV cache, sampling and streaming.

Prompts of different lengths are left-padded to a bucket (a power of two) with
per-row positions, so every row's last prompt token sits in the same column and the
pad never takes part (masked keys, positions counting real tokens only). The prefill
and each decode step are jitted: one compile per (batch, prompt bucket) and per
(batch, length bucket).

MoE layers decode dropless and per token: a capacity-based dispatcher ("einsum")
would make a token's output depend on the other tokens of its group, so decode runs
the same weights through "sorted" (dropless); expert-choice routing (each expert picks
tokens across the sequence) cannot decode causally and is refused.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.inference.cache import empty_cache
from moe_jax.inference.sampling import SamplingConfig, choose
from moe_jax.models import build_model

DROPLESS = ("sorted", "tiled", "pallas", "dense", "auto")


def decode_model_config(model: Mapping[str, Any]) -> dict[str, Any]:
  """`model` with a dropless dispatcher for decoding (see the module docstring)."""
  model = dict(model)
  if model.get("name", "lm") != "lm":
    raise ValueError(f"generation needs a decoder LM (model.name='lm'); got {model.get('name')!r}")
  moe = dict(model.get("moe") or {})
  if moe:
    router = moe.get("router", "top_k")
    name = router if isinstance(router, str) else dict(router).get("name")
    if name == "expert_choice":
      raise ValueError("expert-choice routing cannot decode token by token (each expert "
                       "picks tokens across the whole sequence); generate with a token-choice "
                       "router (top_k)")
    if moe.get("dispatch", "sorted") not in DROPLESS:
      moe["dispatch"] = "sorted"  # same weights, no capacity: per-token routing
    moe["group_size"] = None  # groups only bound capacity; a decode step has B tokens
    model["moe"] = moe
  return model


def _bucket(n: int, smallest: int = 8) -> int:
  return max(smallest, 1 << (int(n) - 1).bit_length())


@dataclasses.dataclass
class Generator:
  """`Generator(model_config, variables)(prompts, sampling)` -> new token ids per prompt.

  variables: {"params": ..., and "router_state" when the model has one}."""

  model: Mapping[str, Any]
  variables: Mapping[str, Any]

  def __post_init__(self):
    self.module = build_model(decode_model_config(self.model))
    self._prefill = jax.jit(self._run)
    self._step = jax.jit(self._run)
    self._choose = jax.jit(choose, static_argnums=2)

  def _run(self, variables, cache, tokens_BS, positions_BS, mask_BS):
    logits, updated = self.module.apply({**variables, "cache": cache}, tokens_BS,
                                        positions_BS=positions_BS, mask_BS=mask_BS,
                                        decode=True, method=self.module.logits,
                                        mutable=["cache"])
    return logits[:, -1], updated["cache"]

  def __call__(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(),
               on_tokens: Callable[[np.ndarray], None] | None = None,
               return_logits: bool = False):
    """Up to `sampling.max_new_tokens` new ids per prompt (a row stops after a stop
    token, which is included). `on_tokens(ids [B])` streams each step's tokens.
    With `return_logits`, also the logits [steps, B, V] each step chose from."""
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("every prompt needs at least one token")
    B = len(prompts)
    P = _bucket(max(len(p) for p in prompts))
    L = _bucket(P + sampling.max_new_tokens)
    tokens = np.zeros((B, P), np.int32)
    mask = np.zeros((B, P), bool)
    for b, p in enumerate(prompts):
      tokens[b, P - len(p):], mask[b, P - len(p):] = np.asarray(p, np.int32), True
    # Positions count real tokens only. (With RoPE alone a constant shift per row would
    # not change the outputs, only attention is relative; a learned or absolute position
    # scheme would, so rows start at 0 as if unpadded.)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    variables = dict(self.variables)
    cache = empty_cache(self.module, variables, B, L)
    logits, cache = self._prefill(variables, cache, tokens, positions, mask)
    next_pos = positions[:, -1] + 1
    rng = jax.random.PRNGKey(sampling.seed)
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    seen = []
    stop = set(sampling.stop_tokens)
    for t in range(sampling.max_new_tokens):
      if return_logits:
        seen.append(np.asarray(logits))
      rng, key = jax.random.split(rng)
      ids = np.asarray(self._choose(logits, key, sampling))
      for b in range(B):
        if not done[b]:
          out[b].append(int(ids[b]))
          done[b] = int(ids[b]) in stop
      if on_tokens is not None:
        on_tokens(np.where(done & ~np.isin(ids, list(stop)), -1, ids))
      if done.all() or t == sampling.max_new_tokens - 1:
        break
      logits, cache = self._step(variables, cache, ids[:, None],
                                 next_pos[:, None].astype(np.int32), np.ones((B, 1), bool))
      next_pos = next_pos + 1
    return (out, np.stack(seen)) if return_logits else out
