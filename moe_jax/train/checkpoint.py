"""Orbax checkpoints of the train state and the data iterators' positions.

Saves are atomic (Orbax writes a temporary directory and renames it), so a run killed
at any moment leaves its last committed checkpoint intact; temporary directories of a
killed write are removed when the next run opens the directory. With `async_save` the
write goes on in the background while training continues; its failure surfaces, in one
line, at the next save, at `wait()` or at `close()`.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
import traceback
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import flags

from moe_jax.train import barriers, faults


def _use_barriers_with_timeouts() -> None:
  """Multi-host: Orbax's own barriers through JAX's coordination service, which time out
  and name the late processes, instead of device collectives that wait forever. Orbax
  reads this from an absl flag, so it is set only once flags are parsed (the CLI)."""
  if jax.process_count() > 1 and flags.FLAGS.is_parsed():
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True


class SaveError(RuntimeError):
  """A checkpoint write failed; the message is one line."""


class RestoreError(RuntimeError):
  """A checkpoint did not restore; the message is one line (the innermost cause)."""


def root_message(e: BaseException) -> str:
  """"Type: first line" of the innermost cause (TensorStore's "OUT_OF_RANGE: ... value of
  size 1000" rather than Orbax's wrapper that dumps a whole spec)."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  first = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
  return f"{type(e).__name__}: {first[:300]}"


class _stderr_to(contextlib.AbstractContextManager):
  """Points file descriptor 2 (C++ threads print there) and sys.stderr at `path`; on
  exit, unless `keep` was set, the text goes on to stderr and the file is removed."""

  def __init__(self, path: str):
    self.path, self.keep = path, False

  def __enter__(self):
    sys.stderr.flush()
    self._saved, self._stderr = os.dup(2), sys.stderr
    self._file = open(self.path, "w")  # noqa: SIM115 -- closed in __exit__
    os.dup2(self._file.fileno(), 2)
    sys.stderr = self._file  # Python-level writes too, wherever sys.stderr pointed (notebooks)
    return self

  def __exit__(self, *exc):
    self._file.flush()
    sys.stderr = self._stderr
    os.dup2(self._saved, 2)
    os.close(self._saved)
    self._file.close()
    if not self.keep:  # nothing failed: what was printed goes where it was meant to
      with open(self.path) as f:
        sys.stderr.write(f.read())
      os.remove(self.path)
    return False


class Checkpointer:
  """Keeps the last `keep` checkpoints under `directory`; restores the latest."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = False,
               barrier_timeout_s: float = 600):
    self.directory = os.path.abspath(directory)
    self.async_save = async_save
    _use_barriers_with_timeouts()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(timeout_secs=int(barrier_timeout_s)))
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending: int | None = None  # a step whose background write may not be committed

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def set_aside(self, step: int) -> str:
    """Renames an unreadable step directory to `<step>.unreadable` (kept for inspection,
    no longer a step) and returns the new path."""
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.unreadable"
    n = 1
    while os.path.exists(dst):
      n += 1
      dst = f"{src}.unreadable{n}"
    if jax.process_index() == 0:
      os.rename(src, dst)
    self._manager.reload()
    return dst

  def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
    """Writes `step` (waiting for the commit unless `async_save`). A failed write (disk
    full, unwritable directory) raises SaveError in one line naming the step; committed
    steps stay as they were."""
    self.wait()  # the previous background write first: its error names its own step
    try:
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       data=ocp.args.JsonSave(data_state)),
                         force=True)
    except Exception as e:  # noqa: BLE001 -- Orbax wraps OS errors in many types
      raise self._error(step, e) from e
    self._pending = step
    if not self.async_save:
      self.wait()

  def wait(self) -> None:
    """Blocks until the background write (if any) is committed; SaveError if it failed."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise self._error(step, e) from e
    if step is not None:
      faults.at("committed", step)

  def _error(self, step: int | None, e: Exception) -> SaveError:
    cause = e
    while cause.__cause__ is not None:
      cause = cause.__cause__
    first = (barriers.describe_timeout(str(cause)) or barriers.describe_timeout(str(e))
             or barriers.first_line(cause))
    committed = [s for s in self._manager.all_steps() if s != step]
    return SaveError(f"saving checkpoint {step} in {self.directory} failed "
                     f"({type(cause).__name__}: {first}); the last committed checkpoint is "
                     f"{max(committed) if committed else 'none'}")

  def restore(self, step: int, abstract_state: Any,
              details_path: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The state at `step`, laid out like `abstract_state` (shapes, dtypes, shardings).

    A damaged step makes TensorStore's reader threads print hundreds of tracebacks
    after the error; with `details_path` the process's stderr goes there during the
    attempt (kept only when it fails) and the raised error is RestoreError, one line."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                              data=ocp.args.JsonRestore())
    if details_path is None:
      out = self._manager.restore(step, args=args)
      return out["state"], out["data"]
    failure = None
    with _stderr_to(details_path) as captured:
      try:
        out = self._manager.restore(step, args=args)
      except Exception as e:  # noqa: BLE001 -- Orbax and tensorstore raise many kinds here
        traceback.print_exc()  # the whole chain, into the file
        failure = root_message(e)
      if failure:
        # The exception (now dropped) held the abandoned reads: collected here, their
        # tracebacks go into the file too, not onto the console later.
        gc.collect()
        time.sleep(0.2)
        captured.keep = True
    if failure:
      raise RestoreError(failure)
    return out["state"], out["data"]

  def close(self) -> None:
    """Waits for a background write, then closes (SaveError if that write failed)."""
    try:
      self.wait()
    finally:
      self._manager.close()


def find_saved_params(src: str, flag: str = "path") -> tuple[str, str]:
  """(the Orbax item directory holding "params", a description) for `src`: a workdir of
  experiments.train (its latest checkpoint), one checkpoints/<step> directory, or a
  params directory (experiments.convert / upcycle output). `flag` names `src` in errors."""
  src = os.path.abspath(src)
  ckpts = os.path.join(src, "checkpoints")
  if os.path.isdir(ckpts):
    steps = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit())
    if not steps:
      raise ValueError(f"{flag}={src} holds no checkpoint ({ckpts} has no <step> directory)")
    return os.path.join(ckpts, str(steps[-1]), "state"), f"checkpoint {steps[-1]} of {src}"
  if os.path.isdir(os.path.join(src, "state")):
    return os.path.join(src, "state"), f"checkpoint {src}"
  if os.path.exists(os.path.join(src, "_METADATA")):
    return src, f"parameters {src}"
  raise ValueError(f"{flag}={src} holds no checkpoint: give a workdir of experiments.train, "
                   "one of its checkpoints/<step> directories, or a params directory")


def read_on_host(state_dir: str, collections: tuple[str, ...] = ("params", "router_state")
                 ) -> dict[str, Any]:
  """The named top-level collections of a saved state (those it has), as host numpy arrays.

  Reads only what is asked (not the optimizer state) and whatever device layout wrote
  it: a plain restore would need the topology the checkpoint was written on (a run on 8
  devices read on 1 fails with "Topology mismatch").
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  saved = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
  item = {k: saved[k] for k in collections if k in saved and saved[k]}
  if not item:
    return {}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))
  return {k: dict(v) for k, v in restored.items()}
