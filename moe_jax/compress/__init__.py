"""Compressing a trained MoE: per-expert quantization with group-wise scales (qwix) at
widths chosen under an average-bit budget from expert importance (MC-MoE's mixed
precision), and dynamic pruning at inference (MoEConfig.prune_beta).
`python -m experiments.compress --workdir=DIR --avg_bits=3 --prune_beta=0.3` runs both."""
from moe_jax.compress.allocate import allocate_bits
from moe_jax.compress.quantize import (WIDTHS, error_bound, expert_banks, quantize_matrix,
                                       quantize_params, relative_errors)

__all__ = ["WIDTHS", "allocate_bits", "error_bound", "expert_banks", "quantize_matrix",
           "quantize_params", "relative_errors"]
