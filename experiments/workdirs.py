"""What the post-training tools (experiments.analyze, experiments.compress) read: a
workdir of experiments.train (config.json and its latest or given checkpoint) or a
Hugging Face import of experiments.convert (imported.json and DST/params, with the
byte-level default task of experiments/configs/imported.py)."""
from __future__ import annotations

import json
import os
from typing import Any


def load_run(workdir: str, step: int | None = None) -> tuple[Any, dict[str, Any], int, str]:
  """(experiment config, variables as host arrays, step (0 for an import), description)."""
  # pylint: disable=import-outside-toplevel  (the CLIs parse flags before jax starts)
  from ml_collections import config_dict

  from moe_jax.inference.load import checkpoint_variables
  from moe_jax.train.checkpoint import read_on_host

  if not workdir:
    raise ValueError("--workdir is required (a workdir of experiments.train or an "
                     "experiments.convert import)")
  if os.path.exists(os.path.join(workdir, "imported.json")):
    from experiments.configs import imported
    config = imported.get_config(workdir)
    if step not in (None, 0):
      raise ValueError(f"{workdir} is an import: it has no checkpoint {step} (leave --step out)")
    variables = read_on_host(os.path.join(os.path.abspath(workdir), "params"))
    return config, variables, 0, f"the import in {workdir}"
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{workdir} has no config.json: give a workdir written by "
                     "experiments.train or an experiments.convert import")
  with open(path) as f:
    config = config_dict.ConfigDict(json.load(f))
  step, variables = checkpoint_variables(workdir, step)
  return config, variables, step, f"checkpoint {step} of {workdir}"
