"""Helpers for tests that run `experiments.train` in a subprocess and read what it wrote."""
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*args, env=None, timeout=600):
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO,
                        capture_output=True, text=True, env=env, timeout=timeout)


def final_state(workdir, step):
  """The whole train state saved at `step` (params, optimizer, router state, ...)."""
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step),
                                                         "state"))


def flatten(tree, prefix=""):
  """(path "a/b/0/c", numpy leaf) pairs of a nested dict / list tree; None leaves dropped."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
    yield prefix + "/".join(keys), np.asarray(leaf)


def cache_env(tmp_path):
  """The environment with a persistent compilation cache: reruns skip most compiling."""
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
