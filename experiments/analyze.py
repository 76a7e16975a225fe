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
Bad input: one line (exit 1).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "a workdir of experiments.train")
_GROUP_BY = flags.DEFINE_enum("group_by", "task", ["task", "modality", "label"],
                              "what a group of tokens is")
_DATA = flags.DEFINE_string("data", None, "source spec to run instead of each task's eval "
                            "split (e.g. digits:validation)")
_TASKS = flags.DEFINE_list("tasks", [], "tasks to run (default: all of the config's)")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 8, "batches per task (0: the whole split)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_OUT = flags.DEFINE_string("out", None, "output directory (default: WORKDIR/analysis)")
_PLOTS = flags.DEFINE_bool("plots", True, "write the PNG heatmaps (needs matplotlib)")


def run() -> dict:
  # pylint: disable=import-outside-toplevel  (flags and errors before jax starts)
  from ml_collections import config_dict

  from moe_jax import models
  from moe_jax.analysis import report
  from moe_jax.analysis.collect import collect
  from moe_jax.data import make_source
  from moe_jax.inference.load import checkpoint_variables
  from moe_jax.train import agd
  from moe_jax.train.trainer import task_iterator

  workdir = _WORKDIR.value
  if not workdir:
    raise ValueError("--workdir is required (a workdir of experiments.train)")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{workdir} has no config.json: give a workdir written by experiments.train")
  with open(path) as f:
    config = config_dict.ConfigDict(json.load(f))
  if _MAX_BATCHES.value < 0:
    raise ValueError(f"--max_batches={_MAX_BATCHES.value} must be >= 0")
  tasks = agd.tasks_from_config(config.tasks, lambda spec, kw: make_source(spec, **kw))
  known = [t.name for t in tasks]
  unknown = [t for t in _TASKS.value if t not in known]
  if unknown:
    raise ValueError(f"--tasks: {unknown[0]!r} is not a task of this run; its tasks: "
                     f"{', '.join(known)}")
  tasks = [t for t in tasks if not _TASKS.value or t.name in _TASKS.value]
  step, variables = checkpoint_variables(workdir, _STEP.value)
  model = models.build_model(config.model)
  loader = dict(config.get("data", None) or {})

  def batches(task):
    it = task_iterator(task, _DATA.value or task.eval_source, 0, False, loader)
    try:
      for i, batch in enumerate(it):
        if _MAX_BATCHES.value and i >= _MAX_BATCHES.value:
          break
        yield batch
    finally:
      it.close()

  print(f"analysing checkpoint {step} of {workdir}: tasks {', '.join(t.name for t in tasks)}, "
        f"by {_GROUP_BY.value}, up to {_MAX_BATCHES.value or 'all'} batches each",
        file=sys.stderr, flush=True)
  stats = collect(model, variables, tasks, {t.name: batches(t) for t in tasks},
                          _GROUP_BY.value,
                          on_batch=lambda task, i: print(f"  {task.name}: batch {i + 1}",
                                                         file=sys.stderr, flush=True))
  summary = stats.summary()
  out = _OUT.value or os.path.join(workdir, "analysis")
  meta = {"workdir": os.path.abspath(workdir), "step": step, "group_by": _GROUP_BY.value,
          "data": _DATA.value, "tasks": [t.name for t in tasks],
          "max_batches": _MAX_BATCHES.value}
  written = report.write_tables(summary, out, meta)
  if _PLOTS.value:
    written += report.write_plots(summary, out)
  print(report.format_summary(summary))
  print(f"wrote {len(written)} files to {out}", file=sys.stderr)
  return summary


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    run()
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
