"""What a workdir remembers about its runs: the config, what changed on resume, segments.

- `config.json`: the resolved config of the latest segment (written once its checkpoint
  restored, so a refused resume leaves it as it was); on resume the fields that differ
  from the previous segment's are listed (a warning, or an error with
  `train.on_config_change="error"` unless only RUN_CONTROL fields changed).
- `check_restorable`: a checkpoint whose parameter shapes differ from the model's is one
  line naming the first differing parameter and both shapes (before Orbax tries).
- `summary.json` keeps every segment of a resumed run (steps, wall time, compiles,
  history) with the config, the code version (git) and the package versions. A segment
  is rewritten at each checkpoint (status "running"), so a killed run keeps its record.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import jax

CONFIG_FILE, SUMMARY_FILE = "config.json", "summary.json"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "grain",
            "tensorflow-datasets", "moe_jax")


def config_dict(config) -> dict[str, Any]:
  """A JSON-able dict of an ml_collections config (or a mapping); tuples become lists."""
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(raw, default=lambda o: repr(o)))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, Mapping):
    out = {}
    for k, v in d.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out or {prefix[:-1]: {}}
  return {prefix[:-1]: d}


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """"key: old -> new" for every leaf field that differs (absent on one side included)."""
  a, b = _flat(old), _flat(new)
  return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, "(absent)") != b.get(k, "(absent)")]


# Fields that steer the run, not what it computes: listed when they change on resume, but
# never refused by train.on_config_change="error" (switching that mode on is one of them).
RUN_CONTROL = ("train.on_config_change", "train.log_every", "train.eval_every",
               "train.checkpoint_every", "train.keep_checkpoints", "train.eval_batches",
               "train.tensorboard", "train.barrier_timeout_s", "train.async_checkpoints",
               "train.on_recompile", "train.moe_telemetry", "train.max_consecutive_skips",
               "train.init_params",  # read by a fresh run only, never on resume
               "data.")


def check_config(workdir: str, config, resuming: bool, on_change: str = "warn") -> list[str]:
  """When resuming, the fields that differ from the workdir's config.json; ValueError with
  `on_change="error"` when one of them changes what the run computes."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not (resuming and os.path.exists(path)):
    return []
  with open(path) as f:
    changes = config_changes(json.load(f), config_dict(config))
  strict = [c for c in changes if not c.startswith(RUN_CONTROL)]
  if strict and on_change == "error":
    raise ValueError(f"resuming {workdir} with a changed config ({len(strict)} field(s)): "
                     + "; ".join(strict[:8]) + " (train.on_config_change=warn to go on)")
  return changes


def write_config(workdir: str, config) -> None:
  """config.json := this segment's config (once its checkpoint has restored)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      json.dump(config_dict(config), f, indent=1)


def _path_str(path) -> str:
  parts = []
  for p in path:
    parts.append(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))))
  return "/".join(parts)


def check_restorable(step_dir: str, state, item: str = "state", what: str | None = None) -> None:
  """One line when the checkpoint's params / router state do not fit `state`'s shapes."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from etils import epath  # noqa: PLC0415

  try:  # the handler reads the item directory itself (no step-level metadata warning)
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(step_dir) / item)
  except Exception:  # noqa: BLE001 -- unreadable metadata: let the restore itself report
    return
  stored = {_path_str(p): tuple(getattr(m, "shape", ()) or ())
            for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}
  wanted = {_path_str(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(
                {"params": state.params, "router_state": state.router_state})[0]}
  if item != "state":  # saved parameters (init_params) may come without router state
    wanted = {k: v for k, v in wanted.items()
              if k.startswith("params/") or any(s.startswith("router_state/") for s in stored)}
  name = what or f"checkpoint {os.path.basename(step_dir)}"
  fix = ("use the model config it was made with" if what else
         "resume with the config that wrote it (config.json) or use a new workdir")
  if not any(k.startswith("params/") for k in stored):
    return  # metadata without parameters (damaged): the restore itself will report
  for key, shape in wanted.items():
    if key not in stored:
      raise ValueError(f"{name} does not fit this model: it has no {key} (shape {shape} "
                       f"now); {fix}")
    if stored[key] != shape:
      raise ValueError(f"{name} does not fit this model: {key} has shape {stored[key]} "
                       f"there and {shape} now; {fix}")
  extra = sorted(k for k in stored if k.split("/")[0] in ("params", "router_state")
                 and k not in wanted)
  if extra:
    raise ValueError(f"{name} does not fit this model: it has {extra[0]} (and "
                     f"{len(extra) - 1} more) that the model has not; {fix}")


@functools.cache
def code_version() -> str | None:
  """The git commit of the checked-out package (with "+dirty" for local edits), if any."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                          text=True, timeout=10)
    if head.returncode:
      return None
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return None


@functools.cache
def package_versions() -> dict[str, str]:
  out = {}
  for name in PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def write_summary(workdir: str, segment: dict[str, Any], latest: dict[str, Any]) -> dict:
  """summary.json = `latest` (this segment's results) + every segment so far."""
  path = os.path.join(workdir, SUMMARY_FILE)
  segments: list[dict[str, Any]] = []
  if os.path.exists(path):
    try:
      with open(path) as f:
        segments = list(json.load(f).get("segments", []))
    except (OSError, ValueError):
      logging.warning("%s is unreadable; starting its segment list again", path)
  # A rerun from an earlier step redoes the steps after it: earlier segments are cut back
  # to that step (a killed segment's last record may reach past its last committed
  # checkpoint), and segments that started later are replaced.
  start = segment["start_step"]
  kept = []
  for s in segments:
    if s.get("start_step", 0) >= start:
      continue
    if s.get("end_step", 0) > start:
      s = {**s, "end_step": start, "status": f"{s.get('status')}; redone after step {start}",
           "train_history": [h for h in s.get("train_history", []) if h["step"] <= start]}
    kept.append(s)
  segments = kept
  summary = {**latest, "segments": segments + [segment]}
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(summary, f, indent=1)
  return summary
