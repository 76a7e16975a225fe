r"""lm_tiny_dense: lm_tiny without experts, the same active parameters per token.

Command (2 CPU cores):
  python -m experiments.train --config=experiments/configs/lm_tiny_dense.py --workdir=/tmp/lm_dense

Results (2 CPU cores, 2026-11-30, 800 steps, 1.12M parameters): validation loss
1.352 nats/byte (1.951 bits/byte), next-byte accuracy 0.636.
"""
from experiments.configs import lm_tiny


def get_config(arg: str | None = None):
  return lm_tiny.get_config(arg, moe=False)
