"""SIGKILL a shrunk run at 20 points of its life and restart it each time: the end state
equals an uninterrupted run's, bit for bit (issue 12, item 2; docs/reliability.md).

The kills come from moe_jax.train.faults (MOE_JAX_FAULT), so each lands at a named place:
mid-step, with an asynchronous checkpoint write in flight (before its finalize), right
after a write was committed (after finalize), mid-eval, and after everything but the
summary."""
import json
import os
import re

import numpy as np

from tests.train.runs import cache_env, cli, final_state, flatten

ARGS = ["--config=experiments/configs/lm_tiny.py:smoke", "--config.train.num_steps=32",
        # bias balancing on: its router state must survive every kill bit for bit
        "--config.model.moe.router.bias_update_rate=0.01",
        "--config.train.checkpoint_every=4", "--config.train.log_every=4",
        "--config.train.eval_every=16", "--config.train.eval_batches=2",
        "--config.train.keep_checkpoints=3", "--config.train.async_checkpoints=True",
        "--config.train.tensorboard=False"]
# In order of the run's life. Each must lie after the newest step the previous kill can
# have left committed, so that the restarted run reaches it (an asynchronous write in
# flight at a kill may or may not have been committed).
KILLS = ["start", "step:1", "step:2", "step:3", "save_issued:4", "step:5", "committed:8",
         "step:9", "step:11", "save_issued:12", "eval:16", "committed:20", "step:21",
         "step:22", "save_issued:28", "step:29", "step:30", "committed:32", "eval:32", "finish"]


def _committed(workdir):
  ckpts = workdir / "checkpoints"
  return sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) if ckpts.exists() else []


def _temporary(workdir):
  ckpts = workdir / "checkpoints"
  return [s for s in os.listdir(ckpts) if "tmp" in s] if ckpts.exists() else []


def _history(workdir):
  """Every logged train record of every segment, in step order."""
  summary = json.loads((workdir / "summary.json").read_text())
  return [h for seg in summary["segments"] for h in seg["train_history"]], summary


def test_kills_at_20_points_end_bit_identical_to_an_uninterrupted_run(tmp_path):
  assert len(KILLS) == 20
  env = cache_env(tmp_path)
  whole, parts = tmp_path / "whole", tmp_path / "parts"
  assert cli(*ARGS, f"--workdir={whole}", env=env).returncode == 0
  left_temporary = 0
  for point in KILLS:
    before = _committed(parts)
    run = cli(*ARGS, f"--workdir={parts}", env={**env, "MOE_JAX_FAULT": f"kill@{point}"})
    assert run.returncode == -9, f"{point}: not killed (rc {run.returncode}) {run.stderr[-800:]}"
    resumed = re.search(r"resumed from \S+ at step (\d+)", run.stdout)
    # The latest committed step restores (none: a fresh start), nothing else.
    assert (int(resumed.group(1)) if resumed else 0) == (before[-1] if before else 0), point
    assert "unreadable" not in run.stdout, (point, run.stdout)
    left_temporary += bool(_temporary(parts))
  # At least one kill caught a write in flight; the next start removed its directory.
  assert left_temporary >= 1
  last = cli(*ARGS, f"--workdir={parts}", env=env)
  assert last.returncode == 0, last.stderr[-2000:]
  assert not _temporary(parts)

  a, b = dict(flatten(final_state(whole, 32))), dict(flatten(final_state(parts, 32)))
  assert a.keys() == b.keys() and any(k.startswith("opt_state") for k in a)
  assert any(k.endswith("bias_E") and np.abs(v).max() > 0 for k, v in a.items())
  for k in a:  # params, optimizer moments, router state, step
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  data_a = json.loads((whole / "checkpoints" / "32" / "data" / "metadata").read_text())
  data_b = json.loads((parts / "checkpoints" / "32" / "data" / "metadata").read_text())
  assert data_a == data_b  # data positions
  (hist_a, sum_a), (hist_b, sum_b) = _history(whole), _history(parts)
  assert [h["step"] for h in hist_b] == list(range(4, 33, 4))
  assert hist_a == hist_b  # every logged train metric, over the segments of the killed run
  assert sum_a["eval"] == sum_b["eval"]
