"""Orbax checkpoints of the train state and the data iterators' positions.

Saves are synchronous and atomic (Orbax writes a temporary directory and renames
it), so a run killed at any moment leaves its last finished checkpoint intact.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class SaveError(RuntimeError):
  """A checkpoint write failed; the message is one line."""


class Checkpointer:
  """Keeps the last `keep` checkpoints under `directory`; restores the latest."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

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
    """Writes `step` and waits for the commit. A failed write (disk full, unwritable
    directory) raises SaveError in one line; committed steps stay as they were."""
    try:
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       data=ocp.args.JsonSave(data_state)),
                         force=True)
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 -- Orbax wraps OS errors in many types
      cause = e
      while cause.__cause__ is not None:
        cause = cause.__cause__
      first = (str(cause).strip().splitlines() or [""])[0][:200]
      committed = [s for s in self._manager.all_steps() if s != step]
      raise SaveError(f"saving checkpoint {step} in {self.directory} failed "
                      f"({type(cause).__name__}: {first}); the last committed checkpoint is "
                      f"{max(committed) if committed else 'none'}") from e

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """The state at `step`, laid out like `abstract_state` (shapes, dtypes, shardings)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def close(self) -> None:
    self._manager.close()
