"""Metric logging: TensorBoard event files in the workdir, console progress, averages."""
from __future__ import annotations

import math
import time
from collections.abc import Mapping

import numpy as np


class Averager:
  """Running means of scalar metrics, grouped by a prefix (e.g. the task)."""

  def __init__(self):
    self._sums: dict[str, float] = {}
    self._counts: dict[str, int] = {}

  def add(self, prefix: str, metrics: Mapping[str, float]) -> None:
    for k, v in metrics.items():
      key = f"{prefix}/{k}"
      self._sums[key] = self._sums.get(key, 0.0) + float(v)
      self._counts[key] = self._counts.get(key, 0) + 1

  def pop(self) -> dict[str, float]:
    out = {k: self._sums[k] / self._counts[k] for k in self._sums}
    self._sums, self._counts = {}, {}
    return out


class LoadWindow:
  """Expert loads of every MoE layer over one log window (telemetry).

  `add` takes {"<layer>": load share per expert [E]} for one step; `pop` returns, per
  layer, the window's mean load vector and its summary: max/mean load (1.0 is perfect
  balance, E is one expert taking everything) and the number of dead experts (no
  token at all over the window).
  """

  def __init__(self):
    self._sums: dict[str, np.ndarray] = {}
    self._counts: dict[str, int] = {}

  def add(self, loads: Mapping[str, np.ndarray]) -> None:
    for layer, load in loads.items():
      load = np.asarray(load, np.float64)
      self._sums[layer] = self._sums.get(layer, 0.0) + load
      self._counts[layer] = self._counts.get(layer, 0) + 1

  def pop(self) -> tuple[dict[str, float], dict[str, list[float]]]:
    scalars, loads = {}, {}
    for layer, total in sorted(self._sums.items()):
      mean = total / self._counts[layer]
      loads[layer] = [round(float(v), 6) for v in mean]
      scalars[f"{layer}/max_over_mean_load"] = float(mean.max() / max(mean.mean(), 1e-12))
      scalars[f"{layer}/dead_experts"] = float(np.sum(total <= 0))
    self._sums, self._counts = {}, {}
    return scalars, loads


class SummaryWriter:
  """TensorBoard scalars (tensorboardX: no TensorFlow needed); a no-op when disabled."""

  def __init__(self, logdir: str | None, purge_step: int | None = None):
    """purge_step: a resumed run's first step; TensorBoard then hides the earlier
    segments' points from that step on (steps re-run after the last checkpoint)."""
    self._writer = None
    if logdir:
      from tensorboardX import SummaryWriter as TBWriter  # pylint: disable=import-outside-toplevel
      self._writer = TBWriter(logdir, flush_secs=10, purge_step=purge_step)

  def text(self, tag: str, text: str) -> None:
    if self._writer is not None:
      self._writer.add_text(tag, text, 0)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    for k, v in values.items():
      if np.ndim(v) == 0:
        self._writer.add_scalar(k, float(v), step)

  def histogram(self, step: int, tag: str, values) -> None:
    """A TensorBoard histogram (e.g. the load shares of a layer's experts)."""
    if self._writer is not None:
      self._writer.add_histogram(tag, np.asarray(values, np.float64), step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
  """Steps per second and ETA over the last logging interval, from step time only:
  time spent compiling or evaluating is `exclude`d, so the first ETA is not inflated by
  compiles and the ETA does not jump after each eval."""

  def __init__(self, start_step: int, total_steps: int):
    self.total = total_steps
    self._t, self._step = time.perf_counter(), start_step
    self._excluded = 0.0

  def exclude(self, seconds: float) -> None:
    """Time inside the current interval that was not training steps."""
    self._excluded += seconds

  def update(self, step: int) -> tuple[float, str]:
    now = time.perf_counter()
    rate = (step - self._step) / max(now - self._t - self._excluded, 1e-9)
    self._t, self._step, self._excluded = now, step, 0.0
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    return rate, format_duration(eta)
