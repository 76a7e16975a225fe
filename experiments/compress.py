r"""Compress a trained MoE: per-expert quantization at widths chosen under an average-bit
budget, and dynamic pruning at inference; evaluates each step on the held-out data.

  python -m experiments.compress --workdir=/tmp/lm_tiny --avg_bits=3
  python -m experiments.compress --workdir=/tmp/imp_tiny --avg_bits=2.5 --prune_beta=0.5

1. Importance: one pass over each task's evaluation data (--max_batches) measures each
   expert's activation frequency and mean routing weight (moe_jax.analysis).
2. Widths: each expert's relative quantization error at every width in --widths
   (qwix, group-wise scales of --group_size rows), then the importance-weighted error
   is minimised under --avg_bits (an integer program: moe_jax.compress.allocate).
3. Evaluation of the float model, the quantized one and, with --prune_beta > 0, the
   quantized one pruning a token's slots under prune_beta x its top weight.
Writes OUT (default WORKDIR/compressed) as a workdir: config.json (prune_beta set) and
checkpoints/<step>/state with the dequantized parameters, so experiments.generate,
analyze and train (train.init_params) read it, and compress.json (widths per expert,
sizes, metrics). Bad input: one line (exit 1).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import flags

from experiments import cli
from experiments.cli import one_line_errors

_WORKDIR = flags.DEFINE_string("workdir", None, "a workdir of experiments.train or an "
                               "experiments.convert import")
_AVG_BITS = flags.DEFINE_float("avg_bits", 4.0, "average bits per expert weight")
_WIDTHS = flags.DEFINE_list("widths", ["2", "3", "4", "8"], "bit widths to choose from")
_GROUP_SIZE = flags.DEFINE_integer("group_size", 32, "rows of the contracted axis per scale")
_PRUNE_BETA = flags.DEFINE_float("prune_beta", 0.0, "dynamic pruning threshold (0: off)")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 8, "eval batches per task (0: all)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_OUT = flags.DEFINE_string("out", None, "output workdir (default: WORKDIR/compressed)")


def run() -> dict:
  # pylint: disable=import-outside-toplevel  (flags and errors before jax starts)
  import orbax.checkpoint as ocp

  from experiments.workdirs import Run
  from moe_jax import models
  from moe_jax.compress import WIDTHS, allocate_bits, quantize_params, relative_errors
  from moe_jax.compress.quantize import expert_banks, expert_slices, get_bank
  from moe_jax.interop.output_dir import all_or_nothing

  workdir = _WORKDIR.value
  try:
    widths = sorted({int(b) for b in _WIDTHS.value})
  except ValueError:
    raise ValueError(f"--widths={','.join(_WIDTHS.value)} must be integers") from None
  bad = [b for b in widths if b not in WIDTHS]
  if bad:
    raise ValueError(f"{bad[0]}-bit quantization is not supported; widths: "
                     f"{', '.join(map(str, WIDTHS))}")
  if not widths[0] <= _AVG_BITS.value <= widths[-1]:
    raise ValueError(f"--avg_bits={_AVG_BITS.value} is outside the widths' range: "
                     f"{widths[0]} <= avg_bits <= {widths[-1]}")
  if not 0.0 <= _PRUNE_BETA.value <= 1.0:
    raise ValueError(f"--prune_beta={_PRUNE_BETA.value} must be in [0, 1] (0: no pruning)")
  if _GROUP_SIZE.value < 1:
    raise ValueError(f"--group_size={_GROUP_SIZE.value} must be >= 1")
  out = os.path.abspath(_OUT.value or os.path.join(workdir or ".", "compressed"))
  if os.path.exists(out):
    raise ValueError(f"--out={out} exists: give a new directory (nothing is overwritten)")
  run_ = Run.load(workdir, _STEP.value, max_batches=_MAX_BATCHES.value)
  config, variables, step = run_.config, run_.variables, run_.step
  if not config.model.get("moe"):
    raise ValueError(f"{workdir} holds a dense model (no model.moe): nothing to compress")
  say = lambda msg: print(msg, file=sys.stderr, flush=True)
  say(f"1/3 importance: routing of {run_.what} over the eval data")
  summary = run_.routing()
  say(f"2/3 quantization errors at widths {widths} (group size {_GROUP_SIZE.value})")
  errors = relative_errors(variables["params"], widths, _GROUP_SIZE.value)
  keys = sorted(errors)
  importance = []
  for name, e in keys:
    layer = summary.get(name, {}).get("groups", {}).get("all")
    importance.append(0.0 if layer is None else layer["expert_load"][e] * layer["mean_weight"][e])
  numel = {}  # weights per expert, per layer (pyramid models differ by layer)
  for bank in expert_banks(variables["params"]):
    one = expert_slices(get_bank(variables["params"], bank["path"]), bank, 0)
    numel[bank["name"]] = sum(int(np.size(w)) for w in one.values())
  sizes = [float(numel[name]) for name, _ in keys]
  chosen = allocate_bits(importance, [[errors[k][b] for b in widths] for k in keys], sizes,
                         widths, _AVG_BITS.value)
  bits = dict(zip(keys, chosen))
  params, bytes_ = quantize_params(variables["params"], bits, _GROUP_SIZE.value)
  quantized = {**variables, "params": params}
  achieved = float(np.dot(sizes, chosen) / np.sum(sizes))
  say(f"   widths chosen: average {achieved:.3f} bits; "
      + ", ".join(f"{b}-bit: {chosen.count(b)}" for b in widths) + " experts")
  say("3/3 evaluation: float, quantized" + (", quantized + pruned" if _PRUNE_BETA.value else ""))
  results = {"float": run_.evaluate(), "quantized": run_.evaluate(variables=quantized)}
  if _PRUNE_BETA.value:
    pruned_cfg = config.model.to_dict()
    pruned_cfg["moe"]["prune_beta"] = _PRUNE_BETA.value
    results["quantized+pruned"] = run_.evaluate(variables=quantized,
                                                model=models.build_model(pruned_cfg))

  record = {
      "source": os.path.abspath(workdir), "step": step, "avg_bits_budget": _AVG_BITS.value,
      "avg_bits": achieved, "widths": widths, "group_size": _GROUP_SIZE.value,
      "prune_beta": _PRUNE_BETA.value, "max_batches": _MAX_BATCHES.value,
      "expert_bytes": bytes_, "compression": bytes_["float_bytes"] / bytes_["packed_bytes"],
      "experts": [{"layer": n, "expert": e, "bits": b, "importance": imp,
                   "relative_error": errors[(n, e)][b]}
                  for (n, e), b, imp in zip(keys, chosen, importance)],
      "metrics": results,
  }
  out_config = config.to_dict()
  out_config["train"]["init_params"] = None  # the parameters are in its checkpoint
  out_config["model"]["moe"]["prune_beta"] = _PRUNE_BETA.value
  with all_or_nothing(out, prefix=".compress-") as tmp:
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(os.path.join(tmp, "checkpoints", str(step), "state"), quantized)
      ckpt.wait_until_finished()
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(out_config, f, indent=1)
    with open(os.path.join(tmp, "compress.json"), "w") as f:
      json.dump(record, f, indent=1)
  print(format_results(record))
  say(f"wrote {out} (config.json, checkpoints/{step}/state, compress.json)")
  return record


def format_results(record: dict) -> str:
  lines = [f"expert weights: {record['expert_bytes']['float_bytes'] / 2**20:.2f} MiB float32 -> "
           f"{record['expert_bytes']['packed_bytes'] / 2**20:.2f} MiB packed "
           f"({record['compression']:.1f}x) at {record['avg_bits']:.2f} average bits"]
  header = f"{'task':<14} {'metric':<26}" + "".join(f" {k:>17}" for k in record["metrics"])
  lines.append(header)
  first = next(iter(record["metrics"].values()))
  for task, metrics in first.items():
    for key in metrics:
      if key.startswith("eval_") or (key.startswith("moe/") and key != "moe/pruned_slot_fraction"):
        continue
      row = [record["metrics"][v][task].get(key) for v in record["metrics"]]
      lines.append(f"{task[:14]:<14} {key[:26]:<26}" + "".join(
          f" {'-' if x is None else format(x, '.4f'):>17}" for x in row))
  pruned = record["metrics"].get("quantized+pruned")
  if pruned:
    shares = [m.get("moe/pruned_slot_fraction", 0.0) for m in pruned.values()]
    lines.append(f"expert computations skipped by pruning: {100 * np.mean(shares):.1f}% of "
                 "chosen slots (mean over tasks)")
  return "\n".join(lines)


main = one_line_errors(run)


if __name__ == "__main__":
  cli.run(main)
