"""Fault injection at named points of a run, for the reliability tests (docs/reliability.md).

`MOE_JAX_FAULT` holds comma-separated entries `ACTION@POINT[:KEY][/pPROCESS]`:
  kill@save_issued:8       SIGKILL this process when checkpoint 8's write has been issued
  sleep=30@barrier:startup/p1   process 1 sleeps 30 s before the "startup" barrier
ACTION is `kill` (SIGKILL, as the OOM killer or a lost node does) or `sleep=SECONDS`.
KEY is a step number or a barrier name; no KEY matches the first time the point is
reached. Points: start (after the restore, before the first step), step:N (step N ran),
save_issued:N (checkpoint N's write started, asynchronous ones still in flight, and the
run's record in summary.json written),
committed:N (checkpoint N's write finished and was committed), eval:N (mid-way through
the evaluation at step N), finish (all steps, saves and evals done, before the summary),
barrier:NAME (about to wait at a barrier). Unset, `at` is one dict lookup.
"""
from __future__ import annotations

import os
import signal
import time

import jax

ENV = "MOE_JAX_FAULT"


def parse(spec: str) -> dict[tuple[str, str | None], tuple[str, float, int | None]]:
  """{(point, key): (action, seconds, process)}; ValueError in one line when malformed."""
  faults = {}
  for entry in filter(None, (e.strip() for e in spec.split(","))):
    action, sep, where = entry.partition("@")
    where, _, proc = where.partition("/p")
    point, _, key = where.partition(":")
    name, _, seconds = action.partition("=")
    ok = sep and point and name in ("kill", "sleep") and (name == "kill") != bool(seconds)
    try:
      value = float(seconds) if seconds else 0.0
      process = int(proc) if proc else None
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"{ENV} entry {entry!r} is not ACTION@POINT[:KEY][/pPROCESS] with "
                       "ACTION kill or sleep=SECONDS (e.g. kill@save_issued:8)")
    faults[(point, key or None)] = (name, value, process)
  return faults


_FAULTS = parse(os.environ.get(ENV, ""))


def at(point: str, key: object = None) -> None:
  """Acts out the fault registered for `point` (and `key`), if any."""
  if not _FAULTS:
    return
  hit = _FAULTS.pop((point, str(key)), None) or _FAULTS.pop((point, None), None)
  if hit is None:
    return
  action, seconds, process = hit
  if process is not None and process != jax.process_index():
    return
  if action == "sleep":
    time.sleep(seconds)
  else:
    os.kill(os.getpid(), signal.SIGKILL)
