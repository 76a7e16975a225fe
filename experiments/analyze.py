r"""Routing analysis of a trained MoE: how each MoE layer routes its evaluation data.

  python -m experiments.analyze --workdir=/tmp/imp_tiny                  # by task
  python -m experiments.analyze --workdir=/tmp/imp_tiny --group_by=modality
  python -m experiments.analyze --workdir=/tmp/imp_tiny --group_by=label --tasks=image_cls
  python -m experiments.analyze --workdir=/tmp/lm_tiny --data=stdlib_text:validation

Runs the checkpoint (the latest, or --step) over each task's evaluation split (or --data,
a source spec such as `digits:validation`, for every chosen task) and writes, in
WORKDIR/analysis (or --out): routing.json, routing.csv (per MoE layer and group: expert
load, router entropy, dropped slots and tokens, top-1 share, max/mean load),
alignment.csv (Jensen-Shannon divergence between the groups' routing distributions per
layer, in bits) and PNG heatmaps (load, co-activation, alignment); prints a summary.

Steering (moe_jax.analysis.steering): --steer=LAYER:EXPERT=BIAS adds BIAS to that expert's
router logit in that MoE layer (0 = the model's first MoE layer); --steer_group=G
--steer_top=N --steer_bias=B promotes, in --steer_layers (default all), the N experts
group G uses most in the unsteered pass. The run then analyses the steered model too
(OUT/steered/) and prints each task's eval metrics without and with steering
(OUT/steering.json).

  python -m experiments.analyze --workdir=/tmp/imp_tiny --group_by=task \
      --steer_group=image_cls --steer_top=1 --steer_bias=2 --steer_layers=1

Bad input: one line (exit 1).
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags

from experiments import cli
from experiments.cli import one_line_errors

_WORKDIR = flags.DEFINE_string("workdir", None, "a workdir of experiments.train or an "
                               "experiments.convert import")
_GROUP_BY = flags.DEFINE_enum("group_by", "task", ["task", "modality", "label"],
                              "what a group of tokens is")
_DATA = flags.DEFINE_string("data", None, "source spec to run instead of each task's eval "
                            "split (e.g. digits:validation)")
_TASKS = flags.DEFINE_list("tasks", [], "tasks to run (default: all of the config's)")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 8, "batches per task (0: the whole split)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_OUT = flags.DEFINE_string("out", None, "output directory (default: WORKDIR/analysis)")
_PLOTS = flags.DEFINE_bool("plots", True, "write the PNG heatmaps (needs matplotlib)")
_STEER = flags.DEFINE_multi_string("steer", [], "LAYER:EXPERT=BIAS on the router logits "
                                   "(MoE layer index from 0; comma lists allowed)")
_STEER_GROUP = flags.DEFINE_string("steer_group", None, "promote the experts this group uses "
                                   "most (with --steer_top)")
_STEER_TOP = flags.DEFINE_integer("steer_top", 1, "how many of --steer_group's experts")
_STEER_BIAS = flags.DEFINE_float("steer_bias", 2.0, "logit bias for --steer_group's experts")
_STEER_LAYERS = flags.DEFINE_list("steer_layers", [], "MoE layers --steer_group steers "
                                  "(default: all)")


def run() -> dict:
  # pylint: disable=import-outside-toplevel  (flags and errors before jax starts)
  from experiments.workdirs import Run
  from moe_jax.analysis import report

  workdir = _WORKDIR.value
  run_ = Run.load(workdir, _STEP.value, tasks=_TASKS.value, data=_DATA.value,
                  max_batches=_MAX_BATCHES.value)
  print(f"analysing {run_.what}: tasks {', '.join(t.name for t in run_.tasks)}, "
        f"by {_GROUP_BY.value}, up to {_MAX_BATCHES.value or 'all'} batches each",
        file=sys.stderr, flush=True)
  progress = lambda task, i: print(f"  {task.name}: batch {i + 1}", file=sys.stderr, flush=True)
  summary = run_.routing(_GROUP_BY.value, on_batch=progress)
  out = _OUT.value or os.path.join(workdir, "analysis")
  meta = {"workdir": os.path.abspath(workdir), "step": run_.step, "group_by": _GROUP_BY.value,
          "data": _DATA.value, "tasks": [t.name for t in run_.tasks],
          "max_batches": _MAX_BATCHES.value}
  written = report.write_tables(summary, out, meta)
  if _PLOTS.value:
    written += report.write_plots(summary, out)
  print(report.format_summary(summary))
  biases = steering_from_flags(run_.variables["params"], summary)
  if biases:
    print(f"steering: {json.dumps(biases)}", file=sys.stderr, flush=True)
    summary_after = run_.routing(_GROUP_BY.value, steering=biases)
    written += report.write_tables(summary_after, os.path.join(out, "steered"),
                                   {**meta, "steering": biases})
    print("steered routing:\n" + report.format_summary(summary_after))
    before, after = run_.evaluate(), run_.evaluate(steering=biases)
    path = os.path.join(out, "steering.json")
    with open(path, "w") as f:
      json.dump({"steering": biases, "before": before, "after": after}, f, indent=1)
    written.append(path)
    print(report.format_metric_change(before, after))
  print(f"wrote {len(written)} files to {out}", file=sys.stderr)
  return summary


def steering_from_flags(params, summary) -> dict[int, dict[int, float]]:
  """{MoE layer: {expert: bias}} from --steer and --steer_group (one-line errors)."""
  from moe_jax.analysis import steering  # pylint: disable=import-outside-toplevel
  biases = steering.parse_steer(_STEER.value)
  if _STEER_GROUP.value:
    layers = steering.moe_layers(params)
    try:
      chosen = [int(x) for x in _STEER_LAYERS.value] or list(range(len(layers)))
    except ValueError:
      raise ValueError(f"--steer_layers={','.join(_STEER_LAYERS.value)} must be MoE layer "
                       "indices (0, 1, ...)") from None
    if _STEER_TOP.value < 1:
      raise ValueError(f"--steer_top={_STEER_TOP.value} must be >= 1")
    for index in chosen:
      if not 0 <= index < len(layers):
        raise ValueError(f"steering layer {index} is out of range: the model has "
                         f"{len(layers)} MoE layers (0..{len(layers) - 1})")
      for e in steering.most_used_experts(summary[layers[index]["name"]], _STEER_GROUP.value,
                                          _STEER_TOP.value):
        biases.setdefault(index, {})[e] = _STEER_BIAS.value
  steering.steering_variables(params, biases)  # range checks before any steered run
  return biases


main = one_line_errors(run)


if __name__ == "__main__":
  cli.run(main)
