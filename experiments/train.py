r"""Main job: train a config with AGD, e.g.

  python -m experiments.train --config=experiments/configs/imp_tiny.py --workdir=/tmp/imp_tiny
  python -m experiments.train --config=experiments/configs/imp_tiny.py:smoke \
      --config.model.moe.num_experts=16 --workdir=/tmp/imp_smoke

`--config_help` prints the config file's variants and every key with its value (after
any overrides) and exits. Bad flags, config keys, data or workdirs end the run with a
one-line error (exit 1).
SIGTERM (preemption) or Ctrl-C: the current step finishes and is saved, one line says so,
exit 143 (SIGTERM) or 130 (SIGINT); run the same command to resume. A second Ctrl-C
exits at once (130), leaving the last committed checkpoint.
"""
from __future__ import annotations

import importlib.util
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli
from moe_jax.config_errors import config_spec, explain_override_error
from moe_jax.train import TrainingError, train_and_evaluate
from moe_jax.train.barriers import BarrierTimeout
from moe_jax.train.checkpoint import SaveError
from moe_jax.train.preemption import Interrupted

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events, summary.json.")
_CONFIG_HELP = flags.DEFINE_bool("config_help", False,
                                 "Print the config file's description (its variants) and every "
                                 "config key with its value after overrides, then exit.")
flags.mark_flags_as_required(["config"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose config-override errors are one clear line."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(f"error: {explain_override_error(argv, e)}")


def config_help() -> str:
  """The config module's docstring and the resolved config, for --config_help."""
  path = config_flags.get_config_filename(flags.FLAGS["config"]).partition(":")[0]
  spec = importlib.util.spec_from_file_location("_moe_jax_config_help", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return (f"{path}\n{(module.__doc__ or '').strip()}\n\nConfig keys (override any with "
          f"--config.<key>=<value>):\n{_CONFIG.value}")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  try:  # the config loads lazily: a missing file or a failing get_config shows here
    list(_CONFIG.value.keys())
  except (OSError, ValueError) as e:
    path = config_spec(sys.argv) or "?"
    cause = e.__cause__ or e
    first = str(cause).strip().splitlines()[-1 if isinstance(cause, OSError) else 0]
    sys.exit(f"error: config {path!r} could not be loaded: {first.strip()}")
  if _CONFIG_HELP.value:
    print(config_help())
    return
  if not _WORKDIR.value:
    sys.exit("error: --workdir is required (where checkpoints, events and summary.json go)")
  logging.set_verbosity(logging.WARNING)
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except Interrupted as e:  # SIGTERM / Ctrl-C: the step was saved
    print(e, file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:  # a second Ctrl-C while stopping
    print("interrupted again: exited at once without saving; a rerun resumes from the last "
          "committed checkpoint (if any)", file=sys.stderr, flush=True)
    sys.exit(130)
  except (ValueError, TrainingError, FileNotFoundError, SaveError, BarrierTimeout) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  cli.run(main, flags_parser=parse_flags)
