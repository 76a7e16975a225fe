r"""lm_tiny_dense: lm_tiny without experts, the same active parameters per token.

Command (2 CPU cores):
  python -m experiments.train --config=experiments/configs/lm_tiny_dense.py --workdir=/tmp/lm_dense

Results: RESULTS_PLACEHOLDER
"""
from experiments.configs import lm_tiny


def get_config(arg: str | None = None):
  return lm_tiny.get_config(arg, moe=False)
