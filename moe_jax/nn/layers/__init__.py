"""Layers that fill an MoE position of a transformer block (registry: MOE_LAYERS).

`MoEConfig.layer` names one (a name or dict(name=..., **options)); every layer is a
Linen module built as `cls(config, dtype, param_dtype, **options, name="moe")` and
called as `layer(x, deterministic=..., context=..., token_mask=...)` on [..., D].
Built in: "moe" (MoELayer: router -> dispatch -> experts -> combine). A new layer is
one file in this package that registers itself (`@MOE_LAYERS.register("my_layer")`);
`MOE_LAYERS.get(name)` imports `moe_jax.nn.layers.<name>` on first use.
"""
from __future__ import annotations

import dataclasses

from moe_jax.registry import Registry

MOE_LAYERS = Registry("layer", package="moe_jax.nn.layers")
# Filled by the block from MoEConfig and the model, not options the user sets.
LAYER_MODULE_FIELDS = ("config", "dtype", "param_dtype", "parent", "name")

from moe_jax.nn.layers.moe import MoELayer  # noqa: E402  (registers "moe")


def layer_options(layer_cls) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(layer_cls)
               if f.name not in LAYER_MODULE_FIELDS)


def check_layer_spec(spec) -> None:
  """Unknown layer names and options fail at config build, in one line."""
  layer_cls = MOE_LAYERS.get(spec.name)
  unknown = sorted(set(spec.kwargs()) - set(layer_options(layer_cls)))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for layer {spec.name!r}; valid: "
                     f"{', '.join(layer_options(layer_cls)) or '(none)'}")
  check = getattr(layer_cls, "check_options", None)
  if check is not None:  # the layer's own value checks, without building it
    check(**spec.kwargs())


def make_moe_layer(cfg, dtype, param_dtype, name: str = "moe"):
  """The layer `cfg.layer` names, with its options."""
  return MOE_LAYERS.get(cfg.layer.name)(cfg, dtype, param_dtype, **cfg.layer.kwargs(),
                                        name=name)


__all__ = ["LAYER_MODULE_FIELDS", "MOE_LAYERS", "MoELayer", "check_layer_spec",
           "layer_options", "make_moe_layer"]
