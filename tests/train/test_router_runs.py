"""The routers of issue 14 under AGD training (experiments.train, a shrunk lm_tiny).

EvoMoE's dense-to-sparse gate keeps its schedule counter in the checkpointed router
state, so a run killed after a checkpoint and resumed ends where an uninterrupted run
ends, counter and temperature included. AdaMoE's null experts are two command-line
overrides of lm_tiny's top_k router and report real experts per token."""
import json

import numpy as np

from tests.train.runs import cache_env, cli, final_state, flatten

STEPS = 4
SHRINK = ["--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.mlp_dim=64",
          "--config.model.moe.expert_hidden_dim=32", "--config.tasks.stdlib_lm.batch_size=4",
          "--config.tasks.stdlib_lm.source_args.seq_len=32", "--config.train.eval_every=100",
          "--config.train.eval_batches=1", "--config.train.tensorboard=False",
          "--config.train.moe_telemetry=False", "--config.train.log_every=1"]
ARGS = ["--config=experiments/configs/lm_tiny.py:dense_to_sparse", *SHRINK,
        # tau 2.0, 1.4, 0.8, 0.2 over the four steps; hard top-1 from the fourth
        "--config.model.moe.router.tau_max=2.0", "--config.model.moe.router.tau_min=0.2",
        "--config.model.moe.router.anneal_steps=3", "--config.model.moe.router.switch_step=3",
        f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=2"]


def _history(workdir):
  summary = json.loads((workdir / "summary.json").read_text())
  return [h for seg in summary["segments"] for h in seg["train_history"]]


def test_killed_and_resumed_run_continues_the_schedule(tmp_path):
  env = cache_env(tmp_path)
  whole, parts = tmp_path / "whole", tmp_path / "parts"
  run = cli(*ARGS, f"--workdir={whole}", env=env)
  assert run.returncode == 0, run.stderr[-2000:]
  killed = cli(*ARGS, f"--workdir={parts}", env={**env, "MOE_JAX_FAULT": "kill@committed:2"})
  assert killed.returncode == -9, killed.stderr[-2000:]
  resumed = cli(*ARGS, f"--workdir={parts}", env=env)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "at step 2" in resumed.stdout

  a, b = dict(flatten(final_state(whole, STEPS))), dict(flatten(final_state(parts, STEPS)))
  counters = {k: v for k, v in a.items() if k.startswith("router_state") and k.endswith("calls")}
  assert counters and all(int(v) == STEPS for v in counters.values()), counters
  assert a.keys() == b.keys()
  for k in a:  # params, optimizer moments, the schedule counter, step
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # The temperature each step used, from the logged metrics of both runs.
  tau = lambda hist: [h["train/stdlib_lm/moe/temperature"] for h in hist]
  np.testing.assert_allclose(tau(_history(whole)), [2.0, 1.4, 0.8, 0.2], rtol=1e-5)
  assert tau(_history(parts)) == tau(_history(whole))
  active = [h["train/stdlib_lm/moe/active_experts_per_token"] for h in _history(whole)]
  assert active[0] > 2 and active[-1] == 1.0, active


def test_null_experts_train_from_two_overrides(tmp_path):
  run = cli("--config=experiments/configs/lm_tiny.py", *SHRINK, "--config.train.num_steps=2",
            "--config.train.checkpoint_every=2", "--config.model.moe.dispatch=tiled",
            "--config.model.moe.router.k=4", "--config.model.moe.router.null_experts=4",
            f"--workdir={tmp_path}", env=cache_env(tmp_path))
  assert run.returncode == 0, run.stderr[-2000:]
  real = [h["train/stdlib_lm/moe/real_experts_per_token"] for h in _history(tmp_path)]
  assert len(real) == 2 and all(0 < r < 4 for r in real), real  # top-4 over 8 + 4 nulls
  state = dict(flatten(final_state(tmp_path, 2)))
  w_null = [v for k, v in state.items() if k.startswith("params") and k.endswith("w_null_DE")]
  assert [w.shape for w in w_null] == [(32, 4)]
