"""Which parameters train: `optimizer.trainable`, regexes over parameter paths.

A path is the parameter's keys joined by "/" ("layers/block_1/moe/lora/experts/w_up_EDF");
a parameter trains when any pattern matches it (re.search); no patterns (the default)
train everything. Frozen parameters get no update and no optimizer moments
(optax.multi_transform with set_to_zero), which is what parameter-efficient fine-tuning
(LoRA experts, soft prompts) needs: e.g. trainable=("/lora/",) or ("prompt",).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax


def param_path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def check_patterns(patterns: Any) -> tuple[str, ...]:
  """The patterns as a tuple of strings; one-line errors for anything else or a bad regex."""
  if patterns is None:
    return ()
  if isinstance(patterns, str) or not isinstance(patterns, Sequence) or not all(
      isinstance(p, str) for p in patterns):
    raise ValueError(f"optimizer.trainable={patterns!r} must be a list of regexes over "
                     "parameter paths, e.g. ('/lora/',)")
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"optimizer.trainable pattern {p!r} is not a regex: {e}") from None
  return tuple(patterns)


def trainable_mask(params: Any, patterns: Sequence[str]) -> Any:
  """True where a parameter trains. Patterns that match no parameter are an error (a typo
  would otherwise freeze everything it meant to train)."""
  patterns = check_patterns(patterns)
  if not patterns:
    return jax.tree.map(lambda _: True, params)
  paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  unused = [p for p in patterns if not any(re.search(p, path) for path in paths)]
  if unused:
    raise ValueError(f"optimizer.trainable pattern(s) {unused} match no parameter; e.g. "
                     f"{', '.join(paths[:3])}")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(re.search(p, param_path(path)) for p in patterns), params)


def count(params: Any, patterns: Sequence[str]) -> tuple[int, int]:
  """(trainable, total) parameter counts."""
  leaves = jax.tree.leaves(params)
  mask = jax.tree.leaves(trainable_mask(params, patterns))
  return sum(x.size for x, m in zip(leaves, mask) if m), sum(x.size for x in leaves)
