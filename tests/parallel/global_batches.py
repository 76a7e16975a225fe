"""Writes the first global training batches of lm_tiny and imp_tiny's image task, as every
process of this launch sees them, to OUT.npz (process 0). Run by
tests/parallel/test_two_processes.py once as 1 process x 8 devices and once as 2 processes
x 4 devices: the batches must be the same."""
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from experiments.configs import imp_tiny, lm_tiny
from moe_jax.data import make_source
from moe_jax.parallel.partitioning import global_batch, mesh_from_config
from moe_jax.parallel.sharding import initialize_distributed
from moe_jax.train import agd
from moe_jax.train.trainer import task_iterator


def main(out: str) -> None:
  initialize_distributed(60)
  mesh = mesh_from_config(dict(data=2, fsdp=1, expert=4, model=1))
  arrays = {}
  for config in (lm_tiny.get_config("smoke"), imp_tiny.get_config("smoke")):
    task = agd.tasks_from_config(config.tasks, lambda s, kw: make_source(s, **kw))[0]
    it = task_iterator(task, task.source, seed=7, train=True, loader={})
    for step in range(3):
      batch = global_batch(mesh, next(it))
      for key, value in batch.items():
        arrays[f"{task.name}/{step}/{key}"] = np.asarray(
            multihost_utils.process_allgather(value, tiled=True))
  if jax.process_index() == 0:
    np.savez(out, **arrays)


if __name__ == "__main__":
  main(sys.argv[1])
