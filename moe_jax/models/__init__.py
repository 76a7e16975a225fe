"""Model registry: an experiment's `config.model` (a dict) -> a Linen module.

Every model is called as `model(batch, task=..., deterministic=...) -> (loss, metrics)`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from moe_jax import validation as V
from moe_jax.config import MLAConfig, MoEConfig, TransformerConfig
from moe_jax.models.imp import IMPConfig, IMPModel
from moe_jax.models.lm import DecoderLM, LMConfig
from moe_jax.nn.attention import ATTENTIONS, attention_options
from moe_jax.nn.layers import MOE_LAYERS, layer_options
from moe_jax.nn.routing import ROUTERS, router_options
from moe_jax.registry import drop_exposed_defaults

MODELS = {"imp": (IMPModel, IMPConfig, "encoder"), "lm": (DecoderLM, LMConfig, "decoder")}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def _check_keys(where: str, given: Mapping[str, Any], allowed: set[str]) -> None:
  unknown = sorted(set(given) - allowed)
  if unknown:
    raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {', '.join(sorted(allowed))}")


def _tuples(d: Mapping[str, Any]) -> dict[str, Any]:
  return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def build_model(model_cfg: Mapping[str, Any]):
  """`{"name": "imp" | "lm", "dtype": ..., "moe": {...} | None, <stack and model fields>}`."""
  cfg = _tuples(dict(model_cfg))
  name, dtype = cfg.pop("name", "imp"), cfg.pop("dtype", "float32")
  V.check_choice("model.name", name, MODELS)
  V.check_choice("model.dtype", dtype, DTYPES)
  module_cls, config_cls, stack_field = MODELS[name]
  moe = cfg.pop("moe", None)
  mla = cfg.pop("mla", None)
  stack_keys = _fields(TransformerConfig) - {"moe", "mla"}
  model_keys = _fields(config_cls) - {stack_field}
  _check_keys("config.model", cfg, stack_keys | model_keys | {"name", "dtype", "moe", "mla"})
  if "attention" in cfg:
    cfg["attention"] = drop_exposed_defaults(cfg["attention"], ATTENTIONS, attention_options)
  if moe:
    moe = dict(moe)
    for key, registry, options_of in (("router", ROUTERS, router_options),
                                      ("layer", MOE_LAYERS, layer_options)):
      if key in moe:
        moe[key] = drop_exposed_defaults(moe[key], registry, options_of)
    moe = MoEConfig.from_dict(moe)
  if mla:
    _check_keys("config.model.mla", mla, _fields(MLAConfig))
    mla = MLAConfig(**dict(mla))
  stack = TransformerConfig(moe=moe or None, mla=mla or None,
                            **{k: v for k, v in cfg.items() if k in stack_keys})
  model_config = config_cls(**{stack_field: stack},
                            **{k: v for k, v in cfg.items() if k in model_keys})
  return module_cls(model_config, dtype=DTYPES[dtype])


def stack_config(model) -> TransformerConfig:
  """The TransformerConfig of a model `build_model` made (its encoder or decoder)."""
  for module_cls, _, stack_field in MODELS.values():
    if isinstance(model, module_cls):
      return getattr(model.config, stack_field)
  raise ValueError(f"{type(model).__name__} is not a registered model; known: {', '.join(MODELS)}")
