"""Stop at a step boundary on SIGTERM (preemption) or Ctrl-C, after saving a checkpoint.

One process: SIGTERM and SIGINT set a flag; the trainer finishes the current step,
saves it (waiting for the write), says so in one line and raises `Interrupted`, which
`experiments.train` turns into exit code 143 (SIGTERM) or 130 (SIGINT). A second Ctrl-C
while stopping raises KeyboardInterrupt at once. Several processes: JAX's own preemption
notifier owns SIGTERM and every process polls `reached_preemption_sync_point(step)`, so
all of them save the same step (Ctrl-C stays per process).
"""
from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130}  # 128 + the signal number, as shells report


class Interrupted(Exception):
  """The run stopped on a signal after saving `step`; `exit_code` is what to exit with."""

  def __init__(self, signal_name: str, step: int, saved: bool):
    self.signal_name, self.step, self.exit_code = signal_name, step, EXIT_CODES[signal_name]
    where = f"checkpoint {step} saved" if saved else f"nothing saved (step {step})"
    super().__init__(f"stopped by {signal_name} after step {step}: {where}; run the same "
                     "command to resume")


class StopRequests:
  """Installs the handlers (main thread only) and restores the old ones; also a context
  manager."""

  def __init__(self):
    self.signal_name: str | None = None
    self._old: dict[int, object] = {}
    self._multi = jax.process_count() > 1

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # signals reach the main thread only: nothing to install
    signals = [signal.SIGINT] + ([] if self._multi else [signal.SIGTERM])
    for sig in signals:
      self._old[sig] = signal.signal(sig, self._handle)

  def restore(self) -> None:
    """Puts back the handlers that were there before `install`."""
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old.clear()

  def __enter__(self) -> StopRequests:
    self.install()
    return self

  def __exit__(self, *exc) -> None:
    self.restore()

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # second Ctrl-C: stop now, without saving
    self.signal_name = name
    if jax.process_index() == 0:
      print(f"{name} received: stopping after this step, with a checkpoint (Ctrl-C again to "
            "exit at once)", flush=True)
    logging.info("%s received: saving a checkpoint after this step (Ctrl-C again to "
                    "exit at once)", name)

  def requested(self, step: int) -> str | None:
    """The signal to stop for after `step`, if any (every process agrees on multi-host)."""
    if self.signal_name is None and self._multi:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signal_name = "SIGTERM"
      except RuntimeError:  # no preemption service in this distributed setup
        self._multi = False
    return self.signal_name
