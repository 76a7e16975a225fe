"""Alternating Gradient Descent (AGD): task specs, the task sampler, per-task step cache.

Each optimizer step takes ONE task with its own data, shapes and loss; parameters
and optimizer state are shared. `Task` is a frozen, hashable dataclass so it can be
a static argument of `jax.jit`: one compiled program per task signature, nothing
padded to a common shape.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import numpy as np

from moe_jax import validation as V
from moe_jax.data.transforms import split_spec
from moe_jax.data.transforms import text as text_transforms
from moe_jax.tasks import MODALITIES, TASK_KINDS, Task  # noqa: F401  (re-exported)

SAMPLERS = ("weighted", "interval")


class TaskSampler:
  """Which task each step trains; a pure function of (seed, step), so resumes agree.

  "weighted": task i with probability weight_i / sum(weights), seeded per step.
  "interval": round robin, task i for round(weight_i) consecutive steps per turn.
  """

  def __init__(self, tasks: Sequence[Task], kind: str = "weighted", seed: int = 0):
    V.check_choice("agd.sampler", kind, SAMPLERS)
    if not tasks:
      raise ValueError("no tasks configured: config.tasks is empty")
    self.tasks, self.kind, self.seed = tuple(tasks), kind, seed
    w = np.array([t.weight for t in tasks], np.float64)
    self._p = w / w.sum()
    self._turns = np.repeat(np.arange(len(tasks)), [max(1, round(t.weight)) for t in tasks])

  def task_at(self, step: int) -> Task:
    if self.kind == "interval":
      return self.tasks[self._turns[step % len(self._turns)]]
    rng = np.random.default_rng([self.seed, step])
    return self.tasks[rng.choice(len(self.tasks), p=self._p)]


class RecompileError(RuntimeError):
  """A task compiled a second time: its batch's shapes or dtypes changed."""


def _signature(tree) -> dict[str, str]:
  """Path -> "shape dtype" of every leaf (what a jit cache key is made of)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): f"{tuple(x.shape)} {x.dtype}" for p, x in leaves}


class StepCache:
  """Jits `fn(state, batch, task)` once per task and counts compiles.

  `compiles[task.name]` counts traces; `compile_seconds[task.name]` is the wall time
  of the first call (trace + compile + run), which is what a researcher waits for.
  A second trace for a known task means its shapes changed (a bug: the transforms
  must give every batch one shape): `on_recompile="error"` raises RecompileError
  naming the features whose shapes or dtypes changed, "warn" logs it and goes on.
  """

  def __init__(self, fn: Callable[..., Any], donate_state: bool = True,
               on_recompile: str = "error"):
    V.check_choice("train.on_recompile", on_recompile, ("error", "warn"))
    self.compiles: dict[str, int] = {}
    self.compile_seconds: dict[str, float] = {}
    self._first: dict[str, dict[str, str]] = {}

    def counted(state, batch, task):
      self.compiles[task.name] = self.compiles.get(task.name, 0) + 1
      seen = {**_signature({"state": state}), **_signature({"batch": batch})}
      if task.name in self._first:
        self._recompiled(task.name, self._first[task.name], seen, on_recompile)
      else:
        self._first[task.name] = seen
      return fn(state, batch, task)

    self._jitted = jax.jit(counted, static_argnames=("task",),
                           donate_argnums=(0,) if donate_state else ())

  @staticmethod
  def _recompiled(name: str, first: dict[str, str], now: dict[str, str], mode: str) -> None:
    changed = [f"{k}: {first.get(k, 'absent')} -> {now.get(k, 'absent')}"
               for k in sorted(set(first) | set(now)) if first.get(k) != now.get(k)]
    what = "; ".join(changed[:6]) if changed else "same shapes and dtypes (a weak type, " \
        "sharding or Python value changed)"
    msg = (f"task {name!r} compiled a second time (every batch of a task must have one "
           f"shape): {what}")
    if mode == "error":
      raise RecompileError(msg)
    logging.warning(msg)

  def __call__(self, state, batch: Mapping[str, Any], task: Task):
    if task.name in self.compile_seconds:
      return self._jitted(state, batch, task=task)
    t0 = time.perf_counter()
    out = jax.block_until_ready(self._jitted(state, batch, task=task))
    self.compile_seconds[task.name] = time.perf_counter() - t0
    return out


def tasks_from_config(tasks_cfg: Mapping[str, Mapping[str, Any]],
                      describe_source: Callable[[str, dict], Any] | None = None) -> list[Task]:
  """`config.tasks` ({name: {field: value}}) -> Tasks, in config order.

  `describe_source(spec, source_args)`, when given, fills num_classes and
  class_names that a task leaves out from its data source.
  """
  fields = {f.name for f in dataclasses.fields(Task)} - {"name", "task_id"}
  tasks = []
  for name, raw in tasks_cfg.items():
    raw = dict(raw)
    unknown = sorted(set(raw) - fields)
    if unknown:
      raise ValueError(f"unknown key(s) {unknown} in config.tasks.{name}; valid keys: "
                       f"{', '.join(sorted(fields))}")
    for key in ("modalities", "class_names"):
      if key in raw:
        raw[key] = tuple(raw[key])
    for key in ("transforms", "eval_transforms"):
      if raw.get(key) is not None:  # checked now: unknown names fail before any data loads
        try:
          raw[key] = split_spec(raw[key])
        except (ValueError, ImportError) as e:
          raise ValueError(f"config.tasks.{name}.{key}: {e}") from None
    for key in ("drop_rates", "source_args", "eval_source_args"):
      if raw.get(key) is not None:  # hashable: Task is a static jit argument
        raw[key] = tuple(sorted((k, _freeze(v)) for k, v in dict(raw[key]).items()
                                if v is not None))
    if "source" not in raw:
      raise ValueError(f"config.tasks.{name} has no 'source'")
    if describe_source is not None and raw.get("kind") in ("classify", "contrastive"):
      src = describe_source(raw["source"], dict(raw.get("source_args", ())))
      raw.setdefault("num_classes", getattr(src, "num_classes", 0))
      raw.setdefault("class_names", tuple(getattr(src, "class_names", ()) or ()))
    if "task_id" in raw:
      raise ValueError(f"config.tasks.{name}.task_id is set from the task's position in "
                       "config.tasks; remove it")
    if "prompt_ids" in raw:
      raise ValueError(f"config.tasks.{name}.prompt_ids is made from the task's tokenize "
                       "transform and prompt_template; remove it")
    task = Task(name=name, task_id=len(tasks), **raw)
    if task.kind == "contrastive" and task.class_names and task.modalities[1] == "text":
      calls = task.transforms if task.eval_transforms is None else task.eval_transforms
      prompts = [task.prompt_template.format(c) for c in task.class_names]
      task = dataclasses.replace(task, prompt_ids=text_transforms.prompt_ids(calls, prompts))
    tasks.append(task)
  return tasks


def _freeze(value: Any) -> Any:
  if isinstance(value, Mapping) or hasattr(value, "items"):
    return flax.core.FrozenDict({k: _freeze(v) for k, v in value.items()})
  return tuple(value) if isinstance(value, list) else value
