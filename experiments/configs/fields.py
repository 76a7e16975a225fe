"""Every dataclass field a config builds, exposed for command-line overrides.

ml_collections configs are locked: `--config.a.b=v` works only for keys the file
lists. `expose_fields(c)` adds each field of the model's config (IMPConfig / LMConfig),
its TransformerConfig and, when the model has MoE layers, MoEConfig, at its default (a
typed placeholder when the default is None), so `--config.model.moe.group_size=64` or
`--config.model.remat=True` works on every shipped config without editing it.
"""
from __future__ import annotations

import dataclasses
import types
import typing

from ml_collections import config_dict

from moe_jax.config import MoEConfig, TransformerConfig
from moe_jax.models import MODELS

_SKIP = {"moe", "encoder", "decoder"}

# Input loading: batches built ahead in `num_threads` threads (grain); num_workers > 0
# builds them in worker processes instead (for heavy Python preprocessing).
LOADER = dict(num_workers=0, num_threads=1, prefetch=2)

# What a run does when something goes wrong, shared by the shipped configs' `train`.
RUN_POLICIES = dict(
    on_recompile="error",  # a task compiling twice stops the run ("warn": go on)
    on_config_change="warn",  # resuming with other config values ("error": stop)
    nonfinite="abort",  # NaN/Inf loss or gradient: stop ("skip_step": skip that step)
    max_consecutive_skips=10,  # skip_step: stop after this many in a row
    async_checkpoints=True,  # write in the background (one save in flight)
    barrier_timeout_s=600.0,  # multi-host: longest wait for a process at start-up / saves
)  # nested configs, set by the file when used


def _placeholder_type(hint) -> type | None:
  """int for `int | None`, and so on; None when the hint is not one simple type."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
    return args[0] if len(args) == 1 and args[0] in (int, float, str, bool) else None
  return None


def _add_defaults(node, cls) -> None:
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    if field.name in _SKIP or (field.name in node and node[field.name] is not None):
      continue
    if field.default is not dataclasses.MISSING:
      default = field.default
    elif field.default_factory is not dataclasses.MISSING:
      default = field.default_factory()
    else:
      continue
    if default is None:
      kind = _placeholder_type(hints[field.name])
      if kind is None:
        continue  # not a plain type: leave it to the file
      node[field.name] = config_dict.placeholder(kind)
    else:
      node[field.name] = default


def expose_fields(c) -> None:
  """Adds the missing model, stack and MoE fields of `c` (in place) at their defaults."""
  model = c.model
  _, config_cls, _ = MODELS[model.get("name", "imp")]
  _add_defaults(model, config_cls)
  _add_defaults(model, TransformerConfig)
  if model.get("moe"):
    _add_defaults(model.moe, MoEConfig)
