"""Where the train state and the batches live on a mesh, from logical axis names.

Parameters name their axes by letter suffix (w_up_EDF, w_qkv_D3HQ, w_down_FD); Flax's
Dense and Embed use "kernel" [in, out] and "embedding" [V, D]. `param_logical_axes`
turns a parameter's path and shape into logical names and the rules of sharding.py
map those to mesh axes: expert banks over `expert`, the model dim over `fsdp` (FSDP),
hidden units and heads over `model`. Optimizer-state leaves end with their
parameter's path (Adam's mu and nu), so the same function places them.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_jax.parallel.sharding import DEFAULT_RULES, logical_to_spec, make_mesh

Rules = Sequence[tuple[str, Any]]
LETTER_AXES = {"D": "embed", "F": "mlp", "H": "heads", "V": "vocab"}


def _leaf_name(path) -> str:
  for key in reversed(path):
    name = getattr(key, "key", getattr(key, "name", None))
    if isinstance(name, str):
      return name
  return ""


def param_logical_axes(path, shape: Sequence[int]) -> tuple[str | None, ...]:
  """Logical names of a parameter's dimensions (None: replicated)."""
  name, ndim = _leaf_name(path), len(shape)
  if name == "kernel" and ndim == 2:
    return ("embed", None)
  if name == "embedding" and ndim == 2:
    return ("vocab", "embed")
  suffix = name.rsplit("_", 1)[-1] if "_" in name else ""
  if not suffix or not suffix.isalnum() or suffix.lower() == suffix or len(suffix) > ndim:
    return (None,) * ndim
  # E is the expert axis only as a bank's leading axis (a router's w_DE stays whole).
  axes = ["expert" if (c == "E" and i == 0) else LETTER_AXES.get(c) for i, c in enumerate(suffix)]
  return (None,) * (ndim - len(suffix)) + tuple(axes)  # scanned layers: a leading layer axis


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _used_axes(mesh: Mesh, axes):
  """Mesh axes of size > 1 only (so specs read as what is really split), or None."""
  kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ())
               if mesh.shape[a] > 1)
  return None if not kept else kept[0] if len(kept) == 1 else kept


def spec_for(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int],
             rules: Rules = DEFAULT_RULES) -> P:
  """The rules' spec, replicating any dimension its mesh axes do not divide."""
  spec = [_used_axes(mesh, a) for a in logical_to_spec(logical, rules)]
  return P(*(a if dim % _axis_size(mesh, a) == 0 else None for dim, a in zip(shape, spec)))


def state_shardings(mesh: Mesh, abstract_tree: Any, rules: Rules = DEFAULT_RULES) -> Any:
  """NamedShardings for params or optimizer state (anything with array leaves)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(mesh, param_logical_axes(path, x.shape),
                                                   x.shape, rules)), abstract_tree)


def mesh_from_config(mesh_cfg: Mapping[str, int] | None) -> Mesh:
  """config.mesh -> Mesh; all axes 1 means one device (even where more are visible)."""
  axes = dict(mesh_cfg or {})
  single = math.prod(int(v) for v in axes.values()) == 1 and jax.process_count() == 1
  return make_mesh(axes, jax.devices()[:1] if single else None)


def batch_shards(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
  return _axis_size(mesh, logical_to_spec(("batch",), rules)[0])


def check_mesh_fits(mesh: Mesh, num_experts: int | Mapping[int, int] | None,
                    batch_sizes: Mapping[str, int], rules: Rules = DEFAULT_RULES) -> None:
  """One-line errors for experts or batches that do not split over the mesh.

  `num_experts`: model.moe.num_experts, or {layer index: experts} when the layers have
  their own counts (model.moe_num_experts, Pyramid-MoE)."""
  expert = mesh.shape.get("expert", 1)
  if isinstance(num_experts, Mapping):
    for j, (layer, n) in enumerate(sorted(num_experts.items())):
      if n % expert:
        raise ValueError(f"model.moe_num_experts[{j}]={n} (layer {layer}) is not divisible by "
                         f"mesh.expert={expert}")
  elif num_experts is not None and num_experts % expert:
    raise ValueError(f"model.moe.num_experts={num_experts} is not divisible by "
                     f"mesh.expert={expert}")
  shards = batch_shards(mesh, rules)
  for name, b in batch_sizes.items():
    if b % shards:
      axes = " x ".join(f"{a}={mesh.shape[a]}" for a in ("data", "fsdp", "expert"))
      what = "eval_batch_size" if name.endswith(" (eval)") else "batch_size"
      raise ValueError(f"task {name.removesuffix(' (eval)')!r}: {what}={b} is not divisible by "
                       f"the {shards} batch shards of mesh {axes}")


def global_batch(mesh: Mesh, local_batch: Any, rules: Rules = DEFAULT_RULES) -> Any:
  """This process's examples -> global arrays sharded over the batch axes."""
  sharding = NamedSharding(mesh, logical_to_spec(("batch",), rules))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
