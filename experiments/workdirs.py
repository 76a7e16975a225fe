"""What the post-training tools (experiments.analyze, experiments.compress) read: a
workdir of experiments.train (config.json and its latest or given checkpoint) or a
Hugging Face import of experiments.convert (imported.json and DST/params, with the
byte-level default task of experiments/configs/imported.py)."""
from __future__ import annotations

import json
import os
from typing import Any


def load_run(workdir: str, step: int | None = None) -> tuple[Any, dict[str, Any], int, str]:
  """(experiment config, variables as host arrays, step (0 for an import), description)."""
  # pylint: disable=import-outside-toplevel  (the CLIs parse flags before jax starts)
  from ml_collections import config_dict

  from moe_jax.inference.load import checkpoint_variables
  from moe_jax.train.checkpoint import read_on_host

  if not workdir:
    raise ValueError("--workdir is required (a workdir of experiments.train or an "
                     "experiments.convert import)")
  if os.path.exists(os.path.join(workdir, "imported.json")):
    from experiments.configs import imported
    config = imported.get_config(workdir)
    if step not in (None, 0):
      raise ValueError(f"{workdir} is an import: it has no checkpoint {step} (leave --step out)")
    variables = read_on_host(os.path.join(os.path.abspath(workdir), "params"))
    return config, variables, 0, f"the import in {workdir}"
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{workdir} has no config.json: give a workdir written by "
                     "experiments.train or an experiments.convert import")
  with open(path) as f:
    config = config_dict.ConfigDict(json.load(f))
  step, variables = checkpoint_variables(workdir, step)
  return config, variables, step, f"checkpoint {step} of {workdir}"


class Run:
  """A trained (or imported) model with its experiment's tasks, for looking inside it:
  `Run.load(workdir).routing(group_by="modality")`, `.evaluate(steering={1: {3: 2.0}})`.

  `data` (a source spec) replaces each task's eval split; `max_batches` (0: all) bounds
  every pass; `steering` ({MoE layer: {expert: bias}}, moe_jax.analysis.steering) biases
  the routers of that pass."""

  def __init__(self, config, variables, step: int, what: str, tasks=(), data: str | None = None,
               max_batches: int = 8):
    # pylint: disable=import-outside-toplevel
    from moe_jax import models
    from moe_jax.data import make_source
    from moe_jax.train import agd
    if max_batches < 0:
      raise ValueError(f"--max_batches={max_batches} must be >= 0")
    self.config, self.variables, self.step, self.what = config, variables, step, what
    self.data, self.max_batches = data, max_batches
    all_tasks = agd.tasks_from_config(config.tasks, lambda spec, kw: make_source(spec, **kw))
    known = [t.name for t in all_tasks]
    unknown = [t for t in tasks if t not in known]
    if unknown:
      raise ValueError(f"--tasks: {unknown[0]!r} is not a task of this run; its tasks: "
                       f"{', '.join(known)}")
    self.tasks = [t for t in all_tasks if not tasks or t.name in tasks]
    self.model = models.build_model(config.model)
    self.loader = dict(config.get("data", None) or {})
    self._routing_fns: dict[str, Any] = {}  # jitted per task, reused across passes
    self._eval_steps: dict[int, Any] = {}

  @classmethod
  def load(cls, workdir: str, step: int | None = None, **kwargs) -> "Run":
    return cls(*load_run(workdir, step), **kwargs)

  def iterators(self) -> dict[str, Any]:
    from moe_jax.train.trainer import task_iterator  # pylint: disable=import-outside-toplevel
    return {t.name: task_iterator(t, self.data or t.eval_source, 0, False, self.loader)
            for t in self.tasks}

  def with_steering(self, steering=None) -> dict[str, Any]:
    from moe_jax.analysis.steering import steering_variables  # pylint: disable=import-outside-toplevel
    # Zeros at every router when unsteered: both passes share one compiled program.
    return {**self.variables, **steering_variables(self.variables["params"], steering or {},
                                                   every_layer=True)}

  def routing(self, group_by: str = "task", steering=None, on_batch=lambda task, i: None):
    """The routing-analysis summary (moe_jax.analysis.RoutingStats.summary)."""
    from moe_jax.analysis.collect import collect  # pylint: disable=import-outside-toplevel
    iters = self.iterators()

    def batches(it):
      for i, batch in enumerate(it.epoch_batches()):
        if self.max_batches and i >= self.max_batches:
          break
        yield batch
    try:
      return collect(self.model, self.with_steering(steering), self.tasks,
                     {n: batches(it) for n, it in iters.items()}, group_by,
                     on_batch=on_batch, compiled=self._routing_fns).summary()
    finally:
      for it in iters.values():
        it.close()

  def evaluate(self, steering=None, variables=None, model=None) -> dict[str, dict]:
    """Each task's eval metrics (+ zero-shot), as training reports them."""
    # pylint: disable=import-outside-toplevel
    from moe_jax.train.step import make_eval_step
    from moe_jax.train.trainer import evaluate
    variables = variables if variables is not None else self.with_steering(steering)
    model = model or self.model
    step = self._eval_steps.get(id(model)) or self._eval_steps.setdefault(
        id(model), (model, make_eval_step(model)))  # the model kept: its id stays its own
    iters = self.iterators()
    try:
      return evaluate(step[1], variables, self.tasks, iters, self.max_batches)
    finally:
      for it in iters.values():
        it.close()
