"""Router steering at inference: a bias on chosen experts' router logits in chosen MoE
layers, e.g. promoting in the middle layers the experts a reference group uses most, as
in Bandarkar et al., "Multilingual Routing in Mixture-of-Experts", arXiv:2510.04694.

The bias is a "steering" variable collection next to "params" (routing/base.py
router_logits adds it before every router's selection): `model.apply({**variables,
**steering_variables(params, {layer: {expert: bias}})}, ...)`. Layers are numbered over
the model's MoE layers in order (`moe_layers(params)`: 0 is the first MoE layer); a large
positive bias forces the expert, a zero bias changes nothing.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moe_jax.nn.routing.base import STEERING_COLLECTION

Steering = Mapping[int, Mapping[int, float]]  # {MoE layer index: {expert: logit bias}}


def natural_key(key: str):
  """Sort key putting block_2 before block_10."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def moe_layers(params: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Every routed MoE layer in model order: {"name" (as the routing analysis names it),
  "router" (path of keys to its router's params), "repeat" (index under scan, or None),
  "num_experts"}."""
  out = []

  def walk(node, path):
    for key in sorted(node, key=natural_key):
      value = node[key]
      if not isinstance(value, Mapping):
        continue
      if key == "router" and "w_DE" in value:
        w = np.shape(value["w_DE"])
        name = "/".join(path)
        repeats = [None] if len(w) == 2 else list(range(w[0]))  # scanned: [R, D, E]
        out.extend({"name": name if r is None else f"{name}@{r}", "router": (*path, key),
                    "repeat": r, "num_experts": int(w[-1])} for r in repeats)
      else:
        walk(value, path + [key])

  walk(params, [])
  # Under scan a unit's repeats interleave with its blocks: order by (unit, repeat, block).
  def order(layer):
    keys = [natural_key(k) for k in layer["router"]]
    scan = next((i for i, k in enumerate(layer["router"]) if k.startswith("scan_")), None)
    if scan is None or layer["repeat"] is None:
      return keys
    return keys[:scan + 1] + [[layer["repeat"]]] + keys[scan + 1:]
  return sorted(out, key=order)


def parse_steer(specs: Sequence[str]) -> dict[int, dict[int, float]]:
  """["LAYER:EXPERT=BIAS", ...] (LAYER and EXPERT may be comma lists: "1,2:0,5=2.5")."""
  out: dict[int, dict[int, float]] = {}
  for spec in specs:
    m = re.fullmatch(r"\s*([\d,\s]+):([\d,\s]+)=\s*([-+0-9.eE]+)\s*", spec)
    if not m:
      raise ValueError(f"--steer={spec!r} must be LAYER:EXPERT=BIAS (e.g. 1:3=2.0; LAYER and "
                       "EXPERT may be comma lists)")
    try:
      bias = float(m.group(3))
    except ValueError:
      raise ValueError(f"--steer={spec!r}: the bias {m.group(3)!r} is not a number") from None
    for layer in (int(x) for x in m.group(1).split(",") if x.strip()):
      for expert in (int(x) for x in m.group(2).split(",") if x.strip()):
        out.setdefault(layer, {})[expert] = bias
  return out


def steering_variables(params: Mapping[str, Any], steering: Steering,
                       every_layer: bool = False) -> dict[str, Any]:
  """{"steering": tree} with `steering`'s biases at each named layer's router (zeros for
  the other repeats of a scanned stack; with `every_layer`, zeros at every other router
  too, so steered and unsteered calls share one variable structure and one compile).
  Layer or expert ids out of range: one line."""
  layers = moe_layers(params)
  if not layers and steering:
    raise ValueError("this model has no routed MoE layer to steer")
  tree: dict[str, Any] = {}
  if every_layer:
    for layer in layers:
      node = tree
      for key in layer["router"]:
        node = node.setdefault(key, {})
      repeats = sum(l["router"] == layer["router"] for l in layers)
      node.setdefault("logit_bias_E", np.zeros(
          (layer["num_experts"],) if layer["repeat"] is None else (repeats, layer["num_experts"]),
          np.float32))
  for index, biases in steering.items():
    if not 0 <= int(index) < len(layers):
      raise ValueError(f"steering layer {index} is out of range: the model has {len(layers)} "
                       f"MoE layers (0..{len(layers) - 1}: "
                       f"{', '.join(l['name'] for l in layers)})")
    layer = layers[int(index)]
    E = layer["num_experts"]
    node = tree
    for key in layer["router"]:
      node = node.setdefault(key, {})
    if "logit_bias_E" not in node:
      repeats = sum(l["router"] == layer["router"] for l in layers)
      node["logit_bias_E"] = np.zeros((E,) if layer["repeat"] is None else (repeats, E),
                                      np.float32)
    for expert, bias in biases.items():
      if not 0 <= int(expert) < E:
        raise ValueError(f"steering expert {expert} is out of range: layer {index} "
                         f"({layer['name']}) has {E} experts (0..{E - 1})")
      if layer["repeat"] is None:
        node["logit_bias_E"][int(expert)] = bias
      else:
        node["logit_bias_E"][layer["repeat"], int(expert)] = bias
  return {STEERING_COLLECTION: tree} if tree else {}


def most_used_experts(layer_summary: Mapping[str, Any], group: str, n: int) -> list[int]:
  """The `n` experts `group` sends the largest share of its slots to in one layer of a
  routing-analysis summary; ties (expert choice gives every expert the same load) go to
  the larger mean router probability, then the lower id."""
  groups = layer_summary["groups"]
  if group not in groups:
    raise ValueError(f"group {group!r} is not in the analysis; groups: "
                     f"{', '.join(g for g in groups if g != 'all')}")
  load = np.asarray(groups[group]["expert_load"])
  probs = np.asarray(groups[group]["routing_distribution"])[:len(load)]
  return [int(e) for e in np.lexsort((np.arange(len(load)), -probs, -np.round(load, 9)))[:n]]
