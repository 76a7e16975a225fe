"""Hugging Face checkpoints in and out: config.json + safetensors <-> moe_jax params.

`load_hf(directory)` -> (model config dict, variables): {"params": ...} plus
"router_state" when the family keeps routing state (DeepSeek-V3's score-correction
bias). Every tensor the family's map names must be there with the right shape, and
every tensor in the files must be used (missing, extra or misshapen tensors are one-line
errors naming them: never a partial model). `save_hf(model, variables, directory,
hf_config)` writes them back; import -> export -> import is exact.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from moe_jax.interop import hf_families as fams
from moe_jax.interop.safetensors_io import TensorReader, write_tensors

DTYPES = ("F32", "F16", "BF16")  # weights are computed on in float32 after the read


def read_hf_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, "config.json")
  if not os.path.isdir(directory):
    raise ValueError(f"{directory} is not a directory")
  if not os.path.exists(path):
    raise ValueError(f"{directory} has no config.json (a Hugging Face checkpoint directory "
                     "holds config.json and *.safetensors)")
  with open(path) as f:
    return json.load(f)


def _to_ours(kind: str, a: np.ndarray, heads: int) -> np.ndarray:
  if kind == "copy":
    return a
  if kind == "linear":
    return a.T
  if kind == "heads_in":
    return a.T.reshape(a.shape[1], heads, -1)
  if kind == "heads_out":
    return a.T.reshape(heads, -1, a.shape[0])
  if kind == "heads_bias":
    return a.reshape(heads, -1)
  raise ValueError(kind)


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "copy":
    return x
  if kind == "linear":
    return x.T
  if kind == "heads_in":  # [D, heads, Q] -> [heads*Q, D]
    return x.reshape(x.shape[0], -1).T
  if kind == "heads_out":  # [H, Q, D] -> [D, H*Q]
    return x.reshape(-1, x.shape[-1]).T
  if kind == "heads_bias":
    return x.reshape(-1)
  raise ValueError(kind)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def expected_shapes(model: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
  """(collection, *path) -> shape of every variable of `model` (built abstractly)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from moe_jax.models import build_model  # noqa: PLC0415

  module = build_model(model)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                              jnp.zeros((1, 2), jnp.int32),
                                              method=module.logits))
  kept = {c: shapes[c] for c in ("params", "router_state") if c in shapes}  # not sown metrics
  return {tuple(getattr(k, "key", k) for k in path): tuple(x.shape)
          for path, x in jax.tree_util.tree_flatten_with_path(kept)[0]}


def load_hf(directory: str, mesh=None, rules=None) -> tuple[dict[str, Any], dict]:
  """(moe_jax model config, variables) from a Hugging Face MoE checkpoint directory.

  Without `mesh`: numpy arrays. With a mesh: each parameter is made shard by shard with
  `jax.make_array_from_callback` in the sharding the logical rules give it, and each
  shard reads only its own part of the files (an expert bank split over `expert` reads
  only that device's experts' tensors), so no expert bank is ever whole on one host."""
  hf = read_hf_config(directory)
  model = fams.model_config(hf)
  reader = TensorReader(directory)
  wanted = fams.entries(hf, model)
  shapes = expected_shapes(model)
  mapped = {(e.collection, *e.path) for e in wanted}
  unmapped = sorted("/".join(p) for p in set(shapes) - mapped)
  if unmapped:  # a bug in the family map, not in the checkpoint
    raise AssertionError(f"the {hf['model_type']} map misses parameters {unmapped}")
  names = reader.names() - fams.ignored_tensors(hf, reader.names())
  needed = [n for e in wanted for n in e.hf]
  missing = [n for n in needed if n not in names]
  if missing:
    raise ValueError(f"{directory}: tensor {missing[0]} is missing ({len(missing)} missing in "
                     "all); nothing was loaded")
  extra = sorted(names - set(needed))
  if extra:
    raise ValueError(f"{directory}: tensor {extra[0]} is not used by the {hf['model_type']} "
                     f"model ({len(extra)} unused in all); nothing was loaded")
  for name in needed:
    dtype = reader.dtype(name)
    if dtype not in DTYPES:
      raise ValueError(f"{directory}: tensor {name} has dtype {dtype}; supported: "
                       f"{', '.join(DTYPES)}")
  for e in wanted:  # shapes first, from the headers only: nothing is read before all fit
    one = _converted_shape(e, reader.shape(e.hf[0]))
    got = (len(e.hf), *one) if e.stacked else one
    if got != shapes[(e.collection, *e.path)]:
      raise ValueError(f"{directory}: tensor {e.hf[0]} gives {'/'.join(e.path)} the shape "
                       f"{got}, but the config needs {shapes[(e.collection, *e.path)]}")
  variables: dict = {}
  for e in wanted:
    if mesh is None:
      value = read_slice(reader, e, ())
    else:
      import jax  # noqa: PLC0415

      from moe_jax.parallel.partitioning import param_logical_axes, spec_for  # noqa: PLC0415
      from moe_jax.parallel.sharding import DEFAULT_RULES  # noqa: PLC0415

      shape = shapes[(e.collection, *e.path)]
      logical = param_logical_axes([jax.tree_util.DictKey(k) for k in e.path], shape)
      sharding = jax.sharding.NamedSharding(mesh, spec_for(mesh, logical, shape,
                                                           rules or DEFAULT_RULES))
      if e.stacked:  # each shard reads only its experts
        read = lambda index, e=e: read_slice(reader, e, index)
      else:  # small next to the banks: read once, sliced for every device that needs it
        read = lambda index, whole=read_slice(reader, e, ()): whole[tuple(index)]
      value = jax.make_array_from_callback(shape, sharding, read)
    _set(variables.setdefault(e.collection, {}), e.path, value)
  return model, variables


def _converted_shape(e, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
  """What _to_ours makes of a tensor of `hf_shape` (from the header: nothing is read)."""
  s, h = tuple(hf_shape), e.heads
  if e.kind == "copy":
    return s
  if e.kind == "linear":
    return s[::-1]
  if e.kind == "heads_in":
    return (s[1], h, s[0] // h)
  if e.kind == "heads_out":
    return (h, s[1] // h, s[0])
  return (h, s[0] // h)  # heads_bias


def read_slice(reader: TensorReader, e, index: tuple) -> np.ndarray:
  """The part `index` (a tuple of slices, () for all) of entry `e`'s parameter; a stacked
  bank reads only the experts in the slice's first axis."""
  index = tuple(index)
  if not e.stacked:
    return _to_ours(e.kind, _as_float32(reader.get(e.hf[0])), e.heads)[index]
  experts = range(len(e.hf))[index[0] if index else slice(None)]
  parts = [_to_ours(e.kind, _as_float32(reader.get(e.hf[i])), e.heads) for i in experts]
  return np.stack(parts)[(slice(None),) + index[1:]]


def _as_float32(a: np.ndarray) -> np.ndarray:
  return np.asarray(a, dtype=np.float32)


def save_hf(model: Mapping[str, Any], variables: Mapping, directory: str,
            hf_config: Mapping[str, Any], max_shard_bytes: int = 2 * 1024**3) -> list[str]:
  """Writes config.json (`hf_config`, the imported one) and safetensors of `variables`
  ({"params": ..., "router_state": ...}).

  Arrays sharded over a mesh are gathered one parameter at a time (jax.device_get)."""
  import jax  # noqa: PLC0415

  attention = model.get("attention", "mha")
  attention = attention if isinstance(attention, str) else dict(attention).get("name")
  if attention != "mha" or model.get("untied_layers"):  # weights no HF family holds
    raise ValueError(f"export to Hugging Face needs plain multi-head attention; this model has "
                     f"attention={attention!r}, untied_layers="
                     f"{tuple(model.get('untied_layers') or ())}")
  moe = dict(model.get("moe") or {})
  name = lambda spec, default: spec if isinstance(spec, str) else dict(spec or {}).get(
      "name", default)
  router, layer = name(moe.get("router"), "top_k"), name(moe.get("layer"), "moe")
  null = 0 if isinstance(moe.get("router"), str) else dict(moe.get("router") or {}).get(
      "null_experts", 0)
  unsupported = [what for what, on in (
      (f"moe.layer={layer!r}", moe and layer != "moe"),
      (f"moe.router={router!r}", moe and router != "top_k"),
      (f"router.null_experts={null}", bool(null)),
      (f"moe_num_experts={tuple(model.get('moe_num_experts') or ())}",
       bool(model.get("moe_num_experts")))) if on]
  if unsupported:  # parameters or semantics no Hugging Face MoE family holds
    raise ValueError(f"export to Hugging Face needs a plain top-k MoE layer with one expert "
                     f"count; this model has {', '.join(unsupported)}")
  # Tensors go out in the checkpoint's own dtype (config.json "dtype" / "torch_dtype"),
  # so a bfloat16 import exports bfloat16, bit for bit.
  dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(
      str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"), np.float32)
  tensors: dict[str, np.ndarray] = {}
  for e in fams.entries(hf_config, model):
    value = np.asarray(jax.device_get(_get(variables[e.collection], e.path)), dtype=np.float32)
    parts = list(value) if e.stacked else [value]
    for name, part in zip(e.hf, parts):
      tensors[name] = _to_hf(e.kind, part).astype(dtype)
  os.makedirs(directory, exist_ok=True)
  files = write_tensors(directory, tensors, max_shard_bytes)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(dict(hf_config), f, indent=1)
  return files + ["config.json"]
