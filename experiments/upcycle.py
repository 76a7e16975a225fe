r"""Upcycle trained dense checkpoints into the MoE model a config describes.

  python -m experiments.upcycle --src=DENSE_WORKDIR --dst=DST \
      --config=experiments/configs/lm_tiny.py [--config.model.moe.num_experts=8 ...]
then fine-tune it (the command is printed, and kept in DST/upcycled.json):
  python -m experiments.train --config=experiments/configs/lm_tiny.py [same overrides] \
      --config.train.init_params=DST/params --workdir=DST/finetune

--src: a workdir of experiments.train (its latest checkpoint), one checkpoints/<step>
directory, or a params directory. Several (--src given N times, or a comma list):
multiplet upcycling, the experts from the N sources' FFNs and everything else from the
first. --granularity=G cuts each dense FFN into G experts of F/G hidden units
(moe.expert_hidden_dim must be F/G, the router's k a multiple of G); --noise adds
Gaussian noise of that size relative to each expert weight's std. Methods and the
exact function they keep: moe_jax/interop/upcycle.py. Nothing is written to --dst
unless the whole conversion succeeded.
"""
from __future__ import annotations

import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli
from moe_jax.config_errors import config_spec, explain_override_error
from moe_jax.interop.upcycle import upcycle

_CONFIG = config_flags.DEFINE_config_file("config", None, "The MoE model's config (path[:arg]).",
                                          lock_config=True)
_SRC = flags.DEFINE_multi_string("src", None, "dense workdir / checkpoint; repeat or comma-list "
                                 "for multiplet upcycling")
_DST = flags.DEFINE_string("dst", None, "output directory (must not exist or be empty)")
_GRANULARITY = flags.DEFINE_integer("granularity", 1, "G experts per dense FFN, each F/G wide")
_NOISE = flags.DEFINE_float("noise", 0.0, "noise added to the experts, relative to each "
                            "weight's std (0: exact copies)")
_SEED = flags.DEFINE_integer("seed", None, "noise seed (default: the config's seed)")


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(f"error: {explain_override_error(argv, e)}")


def train_command(argv: list[str], dst: str) -> str:
  """experiments.train with this config and its overrides, starting from DST/params."""
  overrides = [a for a in argv if a.startswith("--config.")]
  return shlex.join(["python", "-m", "experiments.train", f"--config={config_spec(argv)}",
                     *overrides, f"--config.train.init_params={dst}/params",
                     f"--workdir={dst}/finetune"])


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    srcs = [s for arg in _SRC.value or [] for s in arg.split(",") if s]
    if not srcs or not _DST.value:
      raise ValueError("--src (one or more dense checkpoints), --dst and --config are required")
    if _GRANULARITY.value < 1:
      raise ValueError(f"--granularity={_GRANULARITY.value} must be >= 1")
    if not _NOISE.value >= 0:
      raise ValueError(f"--noise={_NOISE.value} must be >= 0 (relative to each weight's std)")
    command = train_command(sys.argv, _DST.value)
    upcycle(srcs, _DST.value, _CONFIG.value, granularity=_GRANULARITY.value, noise=_NOISE.value,
            seed=_SEED.value, train_command=command, say=lambda s: print(s, flush=True))
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(f"upcycled {len(srcs)} dense checkpoint(s) into {_DST.value}; fine-tune:\n  {command}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main, flags_parser=_parse_flags)
