"""Per-expert weight quantization with group-wise scales, through qwix (Google's JAX
quantization library): symmetric absmax integers of 2, 3, 4 or 8 bits, one scale per
output channel and per `group_size` rows of the contracted axis.

Axis letters: E experts, D model dim, F expert hidden dim, R scan repeats.

The quantized model here is evaluated and saved dequantized (fake quantization: the
numbers a packed int model computes, in float storage); `packed_bytes` is the size the
integer values and scales would take.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from moe_jax.analysis.steering import natural_key

# Expert weights, each expert's slice [contracted, out]: w_up/w_gate [D, F], w_down [F, D].
EXPERT_WEIGHTS = ("w_up_EDF", "w_gate_EDF", "w_down_EFD")
WIDTHS = (2, 3, 4, 8)
SCALE_BYTES = 4  # float32 scales


def _qtype(bits: int):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  if bits not in WIDTHS:
    raise ValueError(f"{bits}-bit quantization is not supported; widths: "
                     f"{', '.join(map(str, WIDTHS))}")
  return {2: "int2", 3: "int3", 4: jnp.int4, 8: jnp.int8}[bits]


def _qwix():
  try:
    import qwix  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError("expert quantization needs qwix: pip install qwix (or "
                     "'moe_jax[compress]')") from e
  return qwix


def group_rows(rows: int, group_size: int) -> int:
  """Rows per scale group: `group_size` when it divides the contracted axis, else all."""
  return group_size if group_size and rows % group_size == 0 else rows


def quantize_matrix(w: np.ndarray, bits: int, group_size: int) -> np.ndarray:
  """w [rows, cols] quantized to `bits` and back (float32)."""
  qwix = _qwix()
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  q = qwix.quantize(jnp.asarray(w, jnp.float32), _qtype(bits), channelwise_axes=(1,),
                    tiled_axes={0: group_rows(w.shape[0], group_size)})
  return np.asarray(qwix.dequantize(q), np.float32)


def error_bound(w: np.ndarray, bits: int, group_size: int) -> np.ndarray:
  """The largest rounding error per element: half a step, the step being the group's
  absmax over the symmetric bound 2^(bits-1) - 0.5 (qwix's, for every width here)."""
  g = group_rows(w.shape[0], group_size)
  absmax = np.abs(w.reshape(w.shape[0] // g, g, w.shape[1])).max(1, keepdims=True)
  step = absmax / (2.0 ** (bits - 1) - 0.5)
  return np.broadcast_to(step / 2, (w.shape[0] // g, g, w.shape[1])).reshape(w.shape)


def packed_bytes(shape: tuple[int, int], bits: int, group_size: int) -> float:
  rows, cols = shape
  return rows * cols * bits / 8 + (rows // group_rows(rows, group_size)) * cols * SCALE_BYTES


def expert_banks(params: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Every routed expert bank: {"name" (the MoE layer's path, "@r" per scan repeat, as the
  routing analysis names it), "path" (keys to the "experts" dict), "repeat", "weights"
  (the present EXPERT_WEIGHTS names), "num_experts"}."""
  out = []

  def walk(node, path):
    for key in sorted(node, key=natural_key):
      value = node[key]
      if not isinstance(value, Mapping):
        continue
      if key == "experts" and "w_up_EDF" in value:
        names = [n for n in EXPERT_WEIGHTS if n in value]
        shape = np.shape(value["w_up_EDF"])
        repeats = [None] if len(shape) == 3 else list(range(shape[0]))
        name = "/".join(path)
        out.extend({"name": name if r is None else f"{name}@{r}", "path": (*path, key),
                    "repeat": r, "weights": names, "num_experts": int(shape[-3])}
                   for r in repeats)
      else:
        walk(value, path + [key])

  walk(params, [])
  return out


def expert_slices(bank_dict: Mapping[str, Any], bank: Mapping[str, Any], expert: int):
  """{weight name: the expert's [contracted, out] matrix} of one bank entry."""
  out = {}
  for name in bank["weights"]:
    w = np.asarray(bank_dict[name])
    w = w[bank["repeat"]] if bank["repeat"] is not None else w
    out[name] = w[expert]
  return out


def get_bank(params: Mapping[str, Any], path) -> Mapping[str, Any]:
  node = params
  for key in path:
    node = node[key]
  return node


def quantize_params(params: Mapping[str, Any], bits: Mapping[tuple[str, int], int],
                    group_size: int) -> tuple[dict[str, Any], dict[str, float]]:
  """(params with every expert (layer name, expert) -> its width quantized and back, sizes:
  {"float_bytes", "packed_bytes", "params"} of the expert weights). Experts missing from
  `bits` stay in float (counted at 4 bytes per value)."""
  import jax  # pylint: disable=import-outside-toplevel
  out = jax.tree.map(lambda x: np.array(x, copy=True), dict(params))
  sizes = {"float_bytes": 0.0, "packed_bytes": 0.0, "params": 0}
  for bank in expert_banks(params):
    target = get_bank(out, bank["path"])
    for e in range(bank["num_experts"]):
      width = bits.get((bank["name"], e))
      for name, w in expert_slices(get_bank(params, bank["path"]), bank, e).items():
        sizes["float_bytes"] += w.size * 4
        sizes["params"] += w.size
        if width is None:
          sizes["packed_bytes"] += w.size * 4
          continue
        q = quantize_matrix(w, width, group_size).astype(target[name].dtype)
        if bank["repeat"] is None:
          target[name][e] = q
        else:
          target[name][bank["repeat"], e] = q
        sizes["packed_bytes"] += packed_bytes(w.shape, width, group_size)
  return out, sizes


def relative_errors(params: Mapping[str, Any], widths, group_size: int
                    ) -> dict[tuple[str, int], dict[int, float]]:
  """{(layer name, expert): {width: ||W - Q(W)||^2 / ||W||^2 over the expert's weights}}."""
  out = {}
  for bank in expert_banks(params):
    for e in range(bank["num_experts"]):
      mats = expert_slices(get_bank(params, bank["path"]), bank, e)
      norm = sum(float(np.sum(np.square(w, dtype=np.float64))) for w in mats.values())
      out[(bank["name"], e)] = {
          b: sum(float(np.sum(np.square(quantize_matrix(w, b, group_size) - w,
                                        dtype=np.float64))) for w in mats.values())
          / max(norm, 1e-30) for b in widths}
  return out
