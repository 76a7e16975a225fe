"""Input checks that fail early with a message naming the field, value and what is allowed.

Every check raises ValueError so that a bad config or shape is reported when a config
or module is built or first called, never as an XLA shape error deep inside a trace.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np


def _is_int(value: Any) -> bool:
  """Python and numpy integers (np.int64(5) counts), never bools."""
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
  """Python and numpy reals (np.float32(0.5) counts), never bools."""
  return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
  """Python and numpy reals, never bools (public for callers' own range checks)."""
  return _is_number(value)


def check_choice(field: str, value: Any, allowed: Iterable[str]) -> None:
  allowed = tuple(allowed)
  if value not in allowed:
    raise ValueError(f"{field}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


def check_int_range(field: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
  """Checks lo <= value <= hi for an integer (either bound may be None)."""
  if not _is_int(value):
    raise ValueError(f"{field}={value!r} must be an integer")
  if (lo is not None and value < lo) or (hi is not None and value > hi):
    lo_s = "-inf" if lo is None else str(lo)
    hi_s = "inf" if hi is None else str(hi)
    raise ValueError(f"{field}={value} is out of range; allowed: {lo_s} <= {field} <= {hi_s}")


def check_positive(field: str, value: Any) -> None:
  if not _is_number(value) or not value > 0:
    raise ValueError(f"{field}={value!r} must be a number > 0")


def check_fraction(field: str, value: Any) -> None:
  """0 <= value < 1."""
  if not _is_number(value) or not 0 <= value < 1:
    raise ValueError(f"{field}={value!r} must be a number in [0, 1)")


def check_rank(name: str, x: Any, rank: int, axes: str) -> None:
  if x.ndim != rank:
    raise ValueError(f"{name} must have rank {rank} ({axes}); got shape {tuple(x.shape)}")
