"""Dense checkpoints -> MoE checkpoints: sparse, granular and multiplet upcycling.

Sparse upcycling (Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from
Dense Checkpoints", arXiv:2212.05055, Fig. 1): every MoE layer's experts start as copies
of that layer's dense FFN ("mlp" -> "moe/experts/w_*_E.."), the router is new (here: the
MoE model's own init, the values `experiments.train` would start from with the same
seed), every other parameter is copied. Optional noise (relative to each weight's std)
breaks the symmetry between the copies.

Granular upcycling (He et al., "Upcycling Large Language Models into Mixture of
Experts", arXiv:2410.07524, sec. 3: virtual groups and weight scaling): with granularity
G, each dense FFN's F hidden units are cut into G shards of F/G units; the FFN is the
sum of its shards, y = sum_g y_g. Expert e holds shard g = e % G with w_down scaled by
G, and the router's columns are tied within each "virtual group" of G consecutive
experts (e // G), so the G shards of a copy get equal scores p_c and are chosen
together when k is a multiple of G. With combine weights summing to 1 over the chosen
experts (renormalised top-k, or k = E) the output is
  sum_c sum_g w_c * G * y_g = G * y * sum_c w_c = y   (the G*|chosen copies| weights sum to 1),
the dense function exactly. Training breaks the ties (the router's columns get different
gradients as soon as the shards differ). A top_k router's routed_scaling_factor s
(DeepSeek-V3: the chosen weights sum to s) is taken back the same way: w_down / s.

Multiplet upcycling (Zhang et al., "CLIP-MoE: Towards Building Mixture of Experts for
CLIP with Diversified Multiplet Upcycling", arXiv:2409.19291, sec. 3): N dense
checkpoints that share everything but their FFNs (fine-tuned from one model with the
rest frozen) give the experts: expert e holds source (e // G) % N. The non-FFN
parameters come from the first source; the others' must have the same shapes (checked),
and a note says when their values differ.

Layout of expert e: t = e % (N * G), source t // G, shard t % G; E must be a multiple
of N * G. The output, DST/params (an Orbax checkpoint of {"params", "router_state"}),
starts a run through `train.init_params`, as `experiments.convert` imports do, rather
than being a workdir to resume: a workdir would fix one optimizer, schedule and step
count, while parameters seed any number of runs (other learning rates, meshes); the
optimizer state starts fresh (the dense model's has no slots for routers or experts).
The function is kept exactly only where no token is dropped: dropless dispatch
("sorted", "tiled", "pallas", "dense"), or einsum with enough capacity.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

DENSE_FFN, MOE = "mlp", "moe"
# Layers (MoEConfig.layer) with a place for the dense FFN: routed FFN experts ("moe"),
# or the frozen FFN under LoRA experts ("lora_moe").
UPCYCLABLE_LAYERS = ("moe", "lora_moe")
# Dense FFN weight -> its expert bank's weight (moe_jax/nn/experts/ffn.py); the hidden
# axis F is the last of up/gate and the first of down.
EXPERT_OF = {"w_up_DF": "w_up_EDF", "w_gate_DF": "w_gate_EDF", "w_down_FD": "w_down_EFD"}
RECORD = "upcycled.json"
Flat = dict[tuple[str, ...], Any]


def find_checkpoint(src: str) -> tuple[str, str]:
  """(the Orbax item directory holding "params", a description) of `--src` (see
  train.checkpoint.find_saved_params)."""
  from moe_jax.train.checkpoint import find_saved_params  # noqa: PLC0415
  return find_saved_params(src, flag="--src")


def load_params(src: str) -> tuple[dict[str, Any], str]:
  """(params as host numpy arrays, description) of `src` (see find_checkpoint)."""
  from moe_jax.train.checkpoint import read_on_host  # noqa: PLC0415

  path, what = find_checkpoint(src)
  saved = read_on_host(path, ("params",))
  if "params" not in saved:
    raise ValueError(f"--src={src}: {what} has no params")
  return saved["params"], what


# Per-layer views. A TransformerStack stores its blocks as layers/block_<i> or, with
# scan_layers, as scan_<j>/block_<u> with a leading [repeats] axis (nn/transformer.py
# scan_plan); dense and MoE models of one architecture may be laid out either way, so
# both are read as "layer[i]" keys (canonical paths) and written back in the target's.

def _is_stack(node) -> bool:
  return isinstance(node, Mapping) and "final_norm" in node and (
      "layers" in node or any(k.startswith("scan_") for k in node))


def _num(key: str) -> int:
  return int(key.rsplit("_", 1)[1])


def _layer_slots(stack) -> list[tuple[str, str, int | None]]:
  """(container, block, index on the scan axis or None) of each layer, in layer order."""
  if "layers" in stack:
    return [("layers", b, None) for b in sorted(stack["layers"], key=_num)]
  slots = []
  for scan in sorted((k for k in stack if k.startswith("scan_")), key=_num):
    blocks = sorted(stack[scan], key=_num)
    repeats = np.shape(traverse_util.flatten_dict(stack[scan][blocks[0]]).popitem()[1])[0]
    slots += [(scan, b, r) for r in range(repeats) for b in blocks]
  return slots


def canonical(tree: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[tuple[str, ...], int | None]]:
  """{canonical path: (stored path, index on the scan axis or None)}: stack layers appear
  as (..., "layer[i]", ...) whatever their layout."""
  out = {}

  def walk(node, path):
    if _is_stack(node):
      for i, (cont, block, r) in enumerate(_layer_slots(node)):
        for rest in traverse_util.flatten_dict(node[cont][block]):
          out[(*path, f"layer[{i}]", *rest)] = ((*path, cont, block, *rest), r)
      for k, v in node.items():
        if k != "layers" and not k.startswith("scan_"):
          walk(v, (*path, k))
    elif isinstance(node, Mapping):
      for k, v in node.items():
        walk(v, (*path, k))
    else:
      out[path] = (path, None)

  walk(tree, ())
  return out


def _get(flat: Flat, where) -> np.ndarray:
  path, r = where
  return np.asarray(flat[path] if r is None else flat[path][r])


def _name(path: Sequence[str]) -> str:
  return "/".join(path)


def _moe_layers(canon) -> list[tuple[str, ...]]:
  """Canonical prefixes (..., "layer[i]") of the MoE layers, in order."""
  seen = []
  for path in canon:
    for j, part in enumerate(path[:-1]):
      if part.startswith("layer[") and path[j + 1] == MOE and path[:j + 1] not in seen:
        seen.append(path[:j + 1])
  return seen


def expert_layout(num_experts: int, num_sources: int, granularity: int) -> list[tuple[int, int]]:
  """(source, shard) of each expert: t = e % (N * G), source t // G, shard t % G."""
  return [((e % (num_sources * granularity)) // granularity, e % granularity)
          for e in range(num_experts)]


def check_layout(num_experts: int, num_sources: int, granularity: int,
                 router_k: int | None = None) -> None:
  """One-line errors for an expert count or router k the sources and G cannot fill."""
  if num_experts % num_sources:
    raise ValueError(f"num_experts={num_experts} is not a multiple of the number of sources "
                     f"({num_sources}): each source must give the same number of experts")
  if num_experts % (num_sources * granularity):
    raise ValueError(f"num_experts={num_experts} is not a multiple of sources x granularity "
                     f"= {num_sources} x {granularity}: every shard of every source needs "
                     "the same number of experts")
  if granularity > 1 and router_k is not None and router_k % granularity:
    raise ValueError(f"granularity={granularity} needs the router's k={router_k} to be a "
                     f"multiple of {granularity}: a token must reach all {granularity} shards "
                     "of each copy it picks")


def upcycle_variables(sources: Sequence[Mapping[str, Any]], target: Mapping[str, Any], *,
                      granularity: int = 1, noise: float = 0.0, seed: int = 0,
                      router_k: int | None = None, combine_sum: float = 1.0,
                      names: Sequence[str] | None = None,
                      say: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
  """The MoE variables: `target` ({"params", "router_state"?}: the MoE model's init)
  with every parameter the dense `sources` (their params trees) have, and each MoE
  layer's experts built from the sources' FFNs of that layer (see the module docstring).
  `router_k`: the top_k router's k (checked against G); `combine_sum`: what a token's
  combine weights sum to (routed_scaling_factor), divided out of w_down; `names` name
  the sources in messages."""
  if granularity < 1:
    raise ValueError(f"granularity={granularity} must be an int >= 1")
  if not noise >= 0:
    raise ValueError(f"noise={noise} must be a number >= 0 (relative to each weight's std)")
  N, G = len(sources), granularity
  names = list(names or [f"source {s}" for s in range(N)])
  flat_src = [traverse_util.flatten_dict(dict(p)) for p in sources]
  canon_src = [canonical(p) for p in sources]
  # Every source must have the first one's parameters and shapes.
  shape = lambda s, path: np.shape(_get(flat_src[s], canon_src[s][path]))
  for s in range(1, N):
    for path in set(canon_src[0]) ^ set(canon_src[s]):
      has, lacks = (0, s) if path in canon_src[0] else (s, 0)
      raise ValueError(f"{names[has]} has {_name(path)} that {names[lacks]} has not: multiplet "
                       "sources must be one architecture")
    for path in canon_src[0]:
      if shape(s, path) != shape(0, path):
        raise ValueError(f"{_name(path)} has shape {shape(s, path)} in {names[s]} and "
                         f"{shape(0, path)} in {names[0]}: multiplet sources must be one "
                         "architecture")
  params = dict(target["params"])
  flat_tgt = traverse_util.flatten_dict(params)
  canon_tgt = canonical(params)
  moe_layers = _moe_layers(canon_tgt)
  if not moe_layers:
    raise ValueError("the MoE config places no MoE layer (moe_every / moe_last / moe_layers): "
                     "nothing to upcycle into")
  ffn_of = {(*layer, DENSE_FFN) for layer in moe_layers}
  is_moe = lambda path: any(path[:len(l) + 1] == (*l, MOE) for l in moe_layers)
  is_ffn = lambda path: path[:-1] in ffn_of

  for path in canon_src[0]:
    if path not in canon_tgt and not is_ffn(path):
      raise ValueError(f"{names[0]} has {_name(path)} (shape {shape(0, path)}) that the MoE "
                       "config's model has not: the config does not match the dense model")

  values: dict[tuple[str, ...], np.ndarray] = {}  # canonical path -> new value
  differ = []
  for path, where in canon_tgt.items():
    if is_moe(path):
      continue
    want = np.shape(_get(flat_tgt, where))
    if path not in canon_src[0]:
      raise ValueError(f"the MoE config's model has {_name(path)} (shape {want}) that "
                       f"{names[0]} has not: the config does not match the dense model")
    value = _get(flat_src[0], canon_src[0][path])
    if value.shape != want:
      raise ValueError(f"{_name(path)} has shape {value.shape} in {names[0]} and {want} in "
                       "the MoE config's model: the config does not match the dense model")
    values[path] = value
    for s in range(1, N):
      if not np.array_equal(_get(flat_src[s], canon_src[s][path]), value):
        differ.append((s, path))
  if differ:
    say(f"note: {len(differ)} non-FFN parameter(s) differ between the sources (first: "
        f"{_name(differ[0][1])} in {names[differ[0][0]]}); the MoE model takes {names[0]}'s")

  rng = np.random.default_rng(seed)
  layout = None
  for n, layer in enumerate(moe_layers):
    experts = (*layer, MOE, "experts")
    up_key = (*experts, "w_up_EDF")
    frozen = (*layer, MOE, DENSE_FFN)  # a lora_moe layer: the dense FFN kept under moe/mlp
    if (*layer, MOE, "lora", "experts", "w_up_EDF") in canon_tgt:
      if N > 1 or G > 1:
        raise ValueError(f"MoE layer {_name(layer)} is a lora_moe layer (one frozen dense FFN "
                         f"plus adapters): it takes one source and granularity 1, not {N} "
                         f"source(s) and granularity {G}")
      for path in canon_tgt:
        if path[:len(frozen)] == frozen:
          dkey = (*layer, DENSE_FFN, *path[len(frozen):])
          value = _get(flat_src[0], canon_src[0][dkey]) if dkey in canon_src[0] else None
          if value is None or value.shape != np.shape(_get(flat_tgt, canon_tgt[path])):
            raise ValueError(f"{_name(path)} has no dense counterpart of its shape in "
                             f"{names[0]} ({_name(dkey)})")
          values[path] = value
      say(f"MoE layer {n + 1}/{len(moe_layers)} ({_name(layer)}): dense FFN kept under the "
          "LoRA experts (their B at zero: the dense function)")
      continue
    if up_key not in canon_tgt:
      raise ValueError(f"MoE layer {_name(layer)} has no experts/w_up_EDF to upcycle into "
                       "(its layer type has no FFN expert bank)")
    E = np.shape(_get(flat_tgt, canon_tgt[up_key]))[0]
    check_layout(E, N, G, router_k)
    layout = expert_layout(E, N, G)
    dense = (*layer, DENSE_FFN)
    for s in range(N):
      if (*dense, "w_up_DF") not in canon_src[s]:
        raise ValueError(f"{names[s]} has no dense FFN {_name(dense)} at MoE layer "
                         f"{_name(layer)} (is it already an MoE layer?)")
    for dense_name, expert_name in EXPERT_OF.items():
      key, dkey = (*experts, expert_name), (*dense, dense_name)
      have = [dkey in canon_src[s] for s in range(N)]
      if (key in canon_tgt) != have[0] or len(set(have)) > 1:
        raise ValueError(f"{_name(key) if key in canon_tgt else _name(dkey)} has no "
                         f"counterpart on the other side: the dense FFN and the experts must "
                         "have the same activation (model.activation, moe.activation)")
      if key not in canon_tgt:
        continue
      want = np.shape(_get(flat_tgt, canon_tgt[key]))
      dense_w = [_get(flat_src[s], canon_src[s][dkey]).astype(np.float32) for s in range(N)]
      F = dense_w[0].shape[0 if dense_name == "w_down_FD" else 1]
      if F % G:
        raise ValueError(f"granularity={G} does not divide the dense FFN width F={F} "
                         f"({_name(dkey)}, shape {dense_w[0].shape})")
      shards = []
      for s, g in layout:
        part = slice(g * (F // G), (g + 1) * (F // G))
        # Shards of w_down carry the factor G that the virtual groups' combine weights
        # (summing to 1/G per shard) take back, and 1 / the weights' sum.
        shards.append(dense_w[s][part] * (G / combine_sum) if dense_name == "w_down_FD"
                      else dense_w[s][:, part])
      value = np.stack(shards)
      if value.shape != want:
        raise ValueError(f"{_name(key)} has shape {want} in the MoE config's model but the "
                         f"dense {_name(dkey)} {dense_w[0].shape} upcycles (granularity={G}) "
                         f"to {value.shape}: the config does not match the dense model")
      if noise:
        std = np.stack([np.std(x) for x in shards]).reshape(-1, 1, 1)
        value = value + noise * std * rng.standard_normal(value.shape, dtype=np.float32)
      values[key] = value
    say(f"MoE layer {n + 1}/{len(moe_layers)} ({_name(layer)}): {E} experts from "
        + (f"{N} sources" if N > 1 else names[0]) + (f", {G} shards each" if G > 1 else ""))

  out = {"params": _write_back(flat_tgt, canon_tgt, values, G, moe_layers)}
  if target.get("router_state"):
    # Router state lives only under routers (a balancing bias_E): tied like their params.
    flat_rs = traverse_util.flatten_dict(dict(target["router_state"]))
    out["router_state"] = traverse_util.unflatten_dict(
        {path: np.asarray(_tie(path, np.asarray(v), G)).astype(np.asarray(v).dtype)
         for path, v in flat_rs.items()})
  out["layout"] = layout
  return out


def _tie(path: tuple[str, ...], value: np.ndarray, G: int) -> np.ndarray:
  """Router arrays whose last axis is experts (axis letter E last in the name: w_DE,
  bias_E, ...) get every column equal to its virtual group's first."""
  suffix = path[-1].rsplit("_", 1)[-1]
  if G == 1 or "router" not in path or not suffix.endswith("E") or "_" not in path[-1]:
    return value
  E = value.shape[-1]
  return value[..., (np.arange(E) // G) * G]


def _write_back(flat_tgt: Flat, canon_tgt, values, G: int, moe_layers) -> dict[str, Any]:
  """The target tree with `values` (canonical paths) in place, router columns tied."""
  out: Flat = {}
  for path, (stored, r) in canon_tgt.items():
    value = values.get(path)
    if value is None:
      value = _get(flat_tgt, (stored, r))
    if any(path[:len(l) + 1] == (*l, MOE) for l in moe_layers):
      value = _tie(path, value, G)
    dtype = np.asarray(flat_tgt[stored]).dtype
    value = np.asarray(value).astype(dtype)
    if r is None:
      out[stored] = value
    else:
      if stored not in out:
        out[stored] = np.array(flat_tgt[stored], dtype=dtype)
      out[stored][r] = value
  return traverse_util.unflatten_dict(out)


# Everything around the conversion: the MoE model's init and writing DST.

def init_moe_variables(config) -> dict[str, Any]:
  """{"params", "router_state"} of the model `config` describes, as `experiments.train`
  initialises it (same seed, every task's init merged), on the host."""
  import jax  # noqa: PLC0415

  from moe_jax import models  # noqa: PLC0415
  from moe_jax.data import make_source  # noqa: PLC0415
  from moe_jax.train import agd  # noqa: PLC0415
  from moe_jax.train.step import init_variables  # noqa: PLC0415
  from moe_jax.train.trainer import first_train_batches  # noqa: PLC0415

  tasks = agd.tasks_from_config(config.tasks, lambda spec, kw: make_source(spec, **kw))
  model = models.build_model(config.model)
  loader = dict(config.get("data", None) or {})
  batches = first_train_batches(tasks, int(config.seed), loader)  # only shapes matter
  variables = init_variables(model, batches, tasks, int(config.seed))
  return jax.tree.map(np.asarray, dict(variables))


def upcycle(srcs: Sequence[str], dst: str, config, *, granularity: int = 1, noise: float = 0.0,
            seed: int | None = None, say: Callable[[str], None] = print,
            train_command: str | None = None) -> dict[str, Any]:
  """Writes DST/params ({"params", "router_state"?}, Orbax) and DST/upcycled.json for the
  MoE model `config` describes, from the dense checkpoints `srcs` (one: sparse or
  granular upcycling; several: multiplet). Nothing is written unless all of it works."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  from moe_jax.config import MoEConfig  # noqa: PLC0415
  from moe_jax.interop.output_dir import all_or_nothing, fresh_dst  # noqa: PLC0415
  from moe_jax.nn.routing import ROUTERS  # noqa: PLC0415
  from moe_jax.train.run_record import config_dict  # noqa: PLC0415

  if not srcs:
    raise ValueError("give at least one --src (a dense workdir or checkpoint)")
  fresh_dst(dst)
  for src in srcs:  # a missing checkpoint fails before any model work
    find_checkpoint(src)
  moe = config.model.get("moe")
  if not moe:
    raise ValueError("the config has no model.moe: upcycling needs an MoE model config")
  moe_cfg = MoEConfig.from_dict(dict(moe))
  if moe_cfg.layer.name not in UPCYCLABLE_LAYERS:
    raise ValueError(f"model.moe.layer={moe_cfg.layer.name!r} cannot be upcycled into; "
                     f"upcycling fills {', '.join(UPCYCLABLE_LAYERS)} layers")
  router_k, combine_sum, renormalize = None, 1.0, False
  if moe_cfg.router.name in ("top_k", "conditioned"):  # set options, or the defaults
    defaults = {f.name: f.default for f in dataclasses.fields(ROUTERS.get(moe_cfg.router.name))}
    option = lambda name: moe_cfg.router.get(name, defaults[name])
    router_k = int(option("k"))
    combine_sum = float(option("routed_scaling_factor"))
    renormalize = bool(option("renormalize")) and router_k > 1
  if moe_cfg.layer.name == "moe" and not (renormalize or router_k == moe_cfg.num_experts):
    say(f"note: router {moe_cfg.router.name!r}"
        + (f" (k={router_k}, renormalize={renormalize})" if router_k else "")
        + " does not give each token combine weights that sum to 1, so the upcycled model "
        "starts from a scaled or mixed dense function, not the dense one (top_k with k > 1 "
        "and renormalize=True keeps it)")
  if not config.model.get("moe_num_experts"):  # per-layer counts: checked per layer
    check_layout(moe_cfg.num_experts, len(srcs), granularity, router_k)
  if moe_cfg.dispatch == "einsum":
    say("note: dispatch=einsum drops tokens past capacity, so the upcycled model matches the "
        "dense one only where none is dropped (dispatch=sorted or tiled: always)")
  sources, names = [], []
  for i, src in enumerate(srcs):
    say(f"reading source {i + 1}/{len(srcs)}: {src}")
    params, what = load_params(src)
    sources.append(params)
    names.append(what)
  say(f"initialising the MoE model ({moe_cfg.num_experts} experts of width "
      f"{moe_cfg.expert_hidden_dim}; router as experiments.train initialises it)")
  target = init_moe_variables(config)
  seed = int(config.seed) if seed is None else int(seed)
  out = upcycle_variables(sources, target, granularity=granularity, noise=noise, seed=seed,
                          router_k=router_k, combine_sum=combine_sum, names=names, say=say)
  layout = out.pop("layout")
  record = {"sources": [os.path.abspath(s) for s in srcs], "checkpoints": names,
            "granularity": granularity, "noise": noise, "seed": seed,
            # lora_moe: the FFN is kept whole under the adapters (no expert copies).
            "experts": [{"source": s, "shard": g} for s, g in layout or ()],
            "model": config_dict(config.model), "train_command": train_command}
  with all_or_nothing(dst, prefix=".upcycle-") as tmp:
    say(f"writing {dst}/params")
    with ocp.StandardCheckpointer() as checkpointer:  # saves in the background: wait
      checkpointer.save(os.path.join(tmp, "params"), out)
      checkpointer.wait_until_finished()
    with open(os.path.join(tmp, RECORD), "w") as f:
      json.dump(record, f, indent=1)
  return record
