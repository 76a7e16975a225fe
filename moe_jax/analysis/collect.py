"""Runs a model over batches with the "routing" collection mutable and feeds every MoE
layer's per-token routing into RoutingStats, grouped by task, modality or label.

A layer sows one record per call (IMP's encoder runs once per modality of a task); under
scan over layers a record's leaves carry a leading [repeats] axis and are split into
one layer per repeat ("<path>@<r>").
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from moe_jax.analysis.stats import ALL, RoutingStats
from moe_jax.nn.losses import ROUTING_COLLECTION
from moe_jax.tasks import MODALITIES, VALID

GROUP_BY = ("task", "modality", "label")


def layer_records(routing: Mapping[str, Any]) -> list[tuple[str, int, dict[str, np.ndarray]]]:
  """(layer path, call index, record as numpy) for every record in a routing collection."""
  out = []

  def walk(node, path):
    for key, value in node.items():
      if isinstance(value, tuple):  # sown entries, one per call
        for call, record in enumerate(value):
          record = jax.tree.map(np.asarray, dict(record))
          repeats = np.asarray(record["num_experts"]).shape
          name = "/".join(path)
          if repeats:  # scanned layers: one record per repeat
            for r in range(repeats[0]):
              out.append((f"{name}@{r}", call, {k: v[r] for k, v in record.items()}))
          else:
            out.append((name, call, record))
      elif isinstance(value, Mapping):
        walk(value, path + [key])

  walk(routing, [])
  return out


def _per_token(values_B: np.ndarray, lead: tuple[int, ...]) -> np.ndarray:
  """A per-example array [B] broadcast over the record's token shape [B, ...]."""
  values_B = np.asarray(values_B).reshape(-1)
  return np.broadcast_to(values_B.reshape((lead[0],) + (1,) * (len(lead) - 1)), lead)


def token_groups(group_by: str, task, call: int, record, batch
                 ) -> tuple[np.ndarray, dict[int, str]]:
  """(group id per token, {id: name}) of one record."""
  lead = np.asarray(record["token_valid"]).shape
  if group_by == "task":
    return np.zeros(lead, np.int32), {0: task.name}
  if group_by == "modality":
    ids = np.asarray(record["modality"])
    if np.all(ids < 0):  # the model gave no modality: the call's input modality
      name = task.modalities[call] if call < len(task.modalities) else f"call {call}"
      return np.zeros(lead, np.int32), {0: name}
    return ids, {i: m for i, m in enumerate(MODALITIES)}
  if "label" not in batch:
    raise ValueError(f"--group_by=label: task {task.name!r} has no labels (kind "
                     f"{task.kind!r}); use task or modality")
  labels = np.asarray(batch["label"])
  if labels.shape[0] != lead[0]:  # a call on another batch axis (e.g. class prompts)
    return np.full(lead, -1, np.int32), {}
  names = {int(c): (task.class_names[int(c)] if task.class_names and int(c) < len(
      task.class_names) else str(int(c))) for c in np.unique(labels)}
  return _per_token(labels, lead).astype(np.int32), names


def collect(model, variables, tasks, batches: Mapping[str, Iterable[Mapping[str, Any]]],
            group_by: str = "task", stats: RoutingStats | None = None,
            on_batch=lambda task, i: None, compiled: dict | None = None) -> RoutingStats:
  """RoutingStats of `model` over each task's `batches[task.name]` (numpy batches).
  `compiled` (a dict the caller keeps for this model) reuses each task's jitted apply
  across calls, e.g. before and after steering."""
  if group_by not in GROUP_BY:
    raise ValueError(f"group_by={group_by!r} is not one of {', '.join(GROUP_BY)}")
  stats = stats or RoutingStats()
  for task in tasks:
    compiled = {} if compiled is None else compiled
    run = compiled.get(task.name) or compiled.setdefault(task.name, jax.jit(
        lambda v, b, task=task: model.apply(v, b, task=task, deterministic=True,
                                            mutable=[ROUTING_COLLECTION])[1]))
    for i, batch in enumerate(batches[task.name]):
      routing = run(variables, batch).get(ROUTING_COLLECTION, {})
      records = layer_records(routing)
      if not records:
        raise ValueError("the model sowed no routing: it has no top-k / expert-choice MoE "
                         "layer (Soft MoE and dense models route no tokens)")
      for layer, call, record in records:
        lead = np.asarray(record["token_valid"]).shape
        if VALID in batch and np.asarray(batch[VALID]).shape[0] == lead[0]:  # eval fill
          record = {**record, "token_valid": record["token_valid"]
                    & _per_token(np.asarray(batch[VALID], bool), lead)}
        groups, names = token_groups(group_by, task, call, record, batch)
        stats.add(layer, record, groups, names)
        stats.add(layer, record, np.zeros(lead, np.int32), {0: ALL})
      on_batch(task, i)
  return stats
