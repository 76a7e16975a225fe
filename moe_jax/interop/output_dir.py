"""All-or-nothing output directories for the tools that write one (experiments.convert,
experiments.upcycle): a failure at any point leaves no half-written --dst behind."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def all_or_nothing(dst: str, prefix: str = ".convert-"):
  """A temporary directory beside `dst`, renamed to it when the block succeeds and
  removed when it fails."""
  parent = os.path.dirname(os.path.abspath(dst)) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
  try:
    yield tmp
    if os.path.exists(dst):
      os.rmdir(dst)  # empty: fresh_dst checked
    os.rename(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def fresh_dst(dst: str) -> None:
  if os.path.exists(dst) and os.listdir(dst):
    raise ValueError(f"--dst={dst} exists and is not empty; give a new directory")
