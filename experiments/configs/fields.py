"""Every dataclass field a config builds, exposed for command-line overrides.

ml_collections configs are locked: `--config.a.b=v` works only for keys the file
lists. `expose_fields(c)` adds each field of the model's config (IMPConfig / LMConfig),
its TransformerConfig and, when the model has MoE layers, MoEConfig and the router's
options, at its default (a typed placeholder when the default is None), so
`--config.model.moe.group_size=64`, `--config.model.moe.router.jitter=0.01` or
`--config.model.remat=True` works on every shipped config without editing it.
"""
from __future__ import annotations

import dataclasses
import types
import typing

from ml_collections import config_dict

from moe_jax.config import MoEConfig, TransformerConfig
from moe_jax.models import MODELS
from moe_jax.nn.attention import ATTENTIONS, attention_options
from moe_jax.nn.layers import MOE_LAYERS, layer_options
from moe_jax.nn.routing import ROUTERS, RouterSpec
from moe_jax.nn.routing.base import router_options

_SKIP = {"moe", "mla", "encoder", "decoder"}

# Input loading: batches built ahead in `num_threads` threads (grain); num_workers > 0
# builds them in worker processes instead (for heavy Python preprocessing).
LOADER = dict(num_workers=0, num_threads=1, prefetch=2)

def stdlib_lm_task(batch_size: int, seq_len: int = 128) -> dict:
  """Byte-level language modelling on the Python standard library's own source (fixed
  held-out files): lm_tiny's task, and an import's default fine-tuning task."""
  return dict(kind="lm", source="stdlib_text:train", eval_source="stdlib_text:validation",
              modalities=("tokens",), batch_size=batch_size, source_args={"seq_len": seq_len})


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


def _expose_spec(node, key: str, default: str, registry, options) -> None:
  """node.<key> (moe.router, moe.layer, model.attention) as dict(name=..., every option of
  that component at its default; a typed placeholder where the default is None), so
  `--config.model.moe.router.jitter=0.01` works whatever the file wrote (a bare name
  included). After `--config...router.name=OTHER` the first component's defaults left in
  the dict are dropped when the model is built (registry.drop_exposed_defaults)."""
  value = node.get(key, default)
  spec = RouterSpec.parse(value, key)
  out = config_dict.ConfigDict(dict(name=spec.name, **spec.kwargs()))
  cls = registry.get(spec.name)
  try:
    hints = typing.get_type_hints(cls)
  except Exception:  # noqa: BLE001 -- unresolvable annotations: no placeholders
    hints = {}
  for name in options(cls):
    if name not in out:
      field = next(f for f in dataclasses.fields(cls) if f.name == name)
      if field.default is None:
        kind = _placeholder_type(hints.get(name))
        if kind is not None:
          out[name] = config_dict.placeholder(kind)
      elif field.default is not dataclasses.MISSING:
        out[name] = field.default
  if isinstance(value, str):  # a typed field: a string cannot become a dict in place
    del node[key]
  node[key] = out


def expose_fields(c) -> None:
  """Adds the missing model, stack, MoE and router fields of `c` (in place) at their
  defaults, and `source_args.data_dir` to every task (unset: not passed to the source),
  so `--config.tasks.image_cls.source=tfds:NAME --config.tasks.image_cls.source_args.
  data_dir=DIR` works; and `train.init_params` (unset: the model's own init), so a run can
  start from experiments.upcycle / convert's DST/params or another run's parameters (its
  workdir or one checkpoints/<step>; optimizer state and step start fresh)."""
  for task in c.get("tasks", {}).values():
    if "source_args" not in task:
      task.source_args = config_dict.ConfigDict()
    if "data_dir" not in task.source_args:
      task.source_args.data_dir = config_dict.placeholder(str)
  if "train" in c and "init_params" not in c.train:  # experiments.upcycle / convert output
    c.train.init_params = config_dict.placeholder(str)
  model = c.model
  _, config_cls, _ = MODELS[model.get("name", "imp")]
  _add_defaults(model, config_cls)
  _add_defaults(model, TransformerConfig)
  if model.get("mla") is None:  # mla replaces the q/k/v attention
    _expose_spec(model, "attention", "mha", ATTENTIONS, attention_options)
  if model.get("moe"):
    _add_defaults(model.moe, MoEConfig)
    _expose_spec(model.moe, "router", "top_k", ROUTERS, router_options)
    _expose_spec(model.moe, "layer", "moe", MOE_LAYERS, layer_options)
