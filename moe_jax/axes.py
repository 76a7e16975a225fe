"""The axis-letter legend: one meaning per letter across the whole repository.

Used in einsum strings, docstrings, array names (`x_TD`) and parameter-name suffixes
(`w_up_EDF`), which parallel/partitioning.py reads to shard parameters. A module that
needs another axis picks an unused letter and says so in its docstring; never reuse
a letter for another meaning. tests/test_axes.py checks every parameter of the shipped
models against this table.
"""
from __future__ import annotations

import re

LEGEND = {
    "T": "tokens",
    "B": "batch",
    "S": "sequence, or tokens per routing group",
    "D": "model dim",
    "F": "expert (or FFN) hidden dim; for LoRA experts their rank (a LoRA expert's hidden width)",
    "E": "experts",
    "K": "slots (experts) per token",
    "C": "capacity per expert and group",
    "G": "routing groups",
    "H": "attention heads",
    "Q": "features per head",
    "V": "vocabulary",
    # DESIGN.md gives R to the LoRA rank; LoRA experts carry their rank as F instead, the
    # hidden width every dispatcher and sharding rule already reads (nn/experts/lora.py).
    "R": "rows of a padded or exchanged buffer (tile-layout kernels, expert parallelism)",
    "N": "devices on the expert axis",
    "L": "experts per device (expert parallelism)",
    "U": "condition (context) features",
    "X": "flattened slots, T * K",
    "I": "row tiles (kernels)",
    "M": "rows of a fixed-size block: a kernel's row tile, an exchange's per-peer bound",
    "A": "a kernel's contraction (input) features",
    "O": "a kernel's outputs (features of a matmul, rows of a gather)",
    "W": "source rows of a gather (permute kernel)",
    "J": "rows gathered per output row (permute kernel)",
    "P": "patch features (tokenizers)",
    "Z": "the q/k/v index in attention einsums (`3` in w_qkv_D3HQ)",
    "Y": "key/value heads (grouped-query attention; Y divides H)",
}  # All 26 capitals now have a meaning: a new axis takes a letter a module does not use
# and says so in its docstring (e.g. J is the permute kernel's; LoRA's rank may use it).
# Digits in a suffix index a stacked axis of that size (w_qkv_D3HQ: q, k, v).
_SUFFIX = re.compile(r"_([A-Z0-9]+)$")


def suffix_letters(name: str) -> str:
  """The axis letters a parameter name ends with ('' when it has none)."""
  m = _SUFFIX.search(name)
  return "" if m is None else "".join(c for c in m.group(1) if not c.isdigit())


def unknown_letters(name: str) -> list[str]:
  """Letters of `name`'s suffix that are not in LEGEND."""
  return [c for c in suffix_letters(name) if c not in LEGEND]
