"""Bit widths per expert under an average-bit budget: MC-MoE's pre-loading mixed-precision
quantization (Huang et al., "MC-MoE: Mixture Compressor for Mixture-of-Experts LLMs
Gains More", arXiv:2410.06270) as an integer program, solved exactly with scipy's MILP:

  minimise  sum_n importance_n * error_n(b_n)
  subject to  sum_n size_n * b_n <= avg_bits * sum_n size_n,  b_n in widths,

where importance is the expert's activation frequency times its mean routing weight and
error_n(b) its measured relative quantization error at width b.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def allocate_bits(importance: Sequence[float], errors: Sequence[Sequence[float]],
                  sizes: Sequence[float], widths: Sequence[int], avg_bits: float) -> list[int]:
  """One width per expert (errors[n][j]: expert n's error at widths[j])."""
  from scipy.optimize import Bounds, LinearConstraint, milp  # pylint: disable=import-outside-toplevel
  widths = [int(b) for b in widths]
  if not widths or sorted(set(widths)) != sorted(widths):
    raise ValueError(f"widths {widths} must be distinct bit widths")
  lo, hi = min(widths), max(widths)
  if not lo <= avg_bits <= hi:
    raise ValueError(f"avg_bits={avg_bits} is outside the widths' range: {lo} <= avg_bits <= {hi}")
  imp = np.asarray(importance, np.float64)
  err = np.asarray(errors, np.float64)
  size = np.asarray(sizes, np.float64)
  N, J = err.shape
  if imp.shape != (N,) or size.shape != (N,) or J != len(widths):
    raise ValueError(f"importance {imp.shape}, errors {err.shape} and sizes {size.shape} do "
                     f"not describe the same {N} experts and {len(widths)} widths")
  # A tiny tie-break towards more bits where importance is 0 (an expert no token used).
  cost = (imp[:, None] * err + 1e-12 * err).ravel()
  one_each = LinearConstraint(np.kron(np.eye(N), np.ones(J)), 1, 1)
  budget = LinearConstraint((size[:, None] * np.asarray(widths, np.float64)[None, :]).ravel()
                            [None, :], -np.inf, avg_bits * size.sum() + 1e-6)
  res = milp(cost, constraints=[one_each, budget], integrality=np.ones(N * J),
             bounds=Bounds(0, 1))
  if not res.success:
    raise ValueError(f"no bit allocation meets avg_bits={avg_bits}: {res.message}")
  choice = np.asarray(res.x).reshape(N, J).argmax(1)
  return [widths[j] for j in choice]
