"""Two JAX processes x 4 CPU devices on one host (issue 12, items 7 and 9): the same global
batches and training as one process x 8 devices; barriers that time out naming the
process that did not arrive; processes with different configs refused."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.train.runs import REPO

LM = ["-m", "experiments.train", "--config=experiments/configs/lm_tiny.py:smoke",
      "--config.mesh.data=2", "--config.mesh.expert=4", "--config.train.tensorboard=False"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  """One persistent compilation cache for the module's launches: a relaunch, or another
  test's launch of the same program, skips the compile."""
  global _CACHE
  _CACHE = str(tmp_path_factory.mktemp("jax_cache"))
  yield


_CACHE = None


def _env(devices, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "MOE_JAX_"))}
  cache = {"JAX_COMPILATION_CACHE_DIR": _CACHE,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"} if _CACHE else {}
  return {**env, **cache, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          **extra}


def _one_process(args):
  run = subprocess.run([sys.executable, *args], cwd=REPO, env=_env(8), capture_output=True,
                       text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  return run


def _two_processes(args, extra_args=((), ()), fault=""):
  """Runs `args` as processes 0 and 1 of one launch; [(returncode, stdout, stderr)] each."""
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, *args, *extra_args[i]], cwd=REPO,
                            env=_env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                                     MOE_JAX_FAULT=fault),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  out = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=600)
    out.append((p.returncode, stdout, stderr))
  return out


def _last_line(stderr):
  return [l for l in stderr.strip().splitlines() if l.startswith("error:")][-1]


def test_two_processes_form_the_same_global_batches_as_one(tmp_path):
  one, two = tmp_path / "one.npz", tmp_path / "two.npz"
  _one_process(["-m", "tests.parallel.global_batches", str(one)])
  runs = _two_processes(["-m", "tests.parallel.global_batches", str(two)])
  assert [rc for rc, _, _ in runs] == [0, 0], runs[0][2][-2000:]
  a, b = np.load(one), np.load(two)
  assert sorted(a.keys()) == sorted(b.keys()) and len(a.keys()) >= 6
  for k in a.keys():
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert not np.array_equal(a["stdlib_lm/0/tokens"], a["stdlib_lm/1/tokens"])


def test_two_processes_train_like_one_process_with_eight_devices(tmp_path):
  _one_process([*LM, f"--workdir={tmp_path / 'one'}"])
  runs = _two_processes([*LM, f"--workdir={tmp_path / 'two'}"])
  assert [rc for rc, _, _ in runs] == [0, 0], runs[0][2][-2000:]
  assert "step 6/6" in runs[0][1] and "step 6/6" not in runs[1][1]  # one console: process 0's
  one = json.loads((tmp_path / "one" / "summary.json").read_text())
  two = json.loads((tmp_path / "two" / "summary.json").read_text())
  assert [h["step"] for h in two["train_history"]] == [3, 6]
  for x, y in zip(one["train_history"], two["train_history"]):
    for k in x:  # the same batches and math; gloo may sum in another order
      np.testing.assert_allclose(x[k], y[k], rtol=2e-5, err_msg=k)
  for k, v in one["eval"]["stdlib_lm"].items():
    np.testing.assert_allclose(v, two["eval"]["stdlib_lm"][k], rtol=2e-5, err_msg=k)
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["3", "6"]


@pytest.mark.parametrize("barrier", ["startup", "save-3"])
def test_a_late_process_times_out_naming_it(tmp_path, barrier):
  runs = _two_processes([*LM, f"--workdir={tmp_path}", "--config.train.barrier_timeout_s=3"],
                        fault=f"sleep=8@barrier:{barrier}/p1")
  assert [rc for rc, _, _ in runs] == [1, 1]
  assert _last_line(runs[0][2]) == (
      f"error: process(es) 1 of 2 did not reach '{barrier}' within 3 s (seen from process 0); "
      "see their logs for what held them (a slow filesystem, a crash, a hang). "
      "train.barrier_timeout_s sets the wait")
  assert _last_line(runs[1][2]).startswith(f"error: process 1 reached '{barrier}' after the "
                                           "others had waited 3 s")
  for _, _, stderr in runs:
    assert "Traceback" not in stderr


def test_processes_with_different_configs_are_refused(tmp_path):
  runs = _two_processes([*LM, f"--workdir={tmp_path}"], extra_args=((), ("--config.seed=1",)))
  for rc, _, stderr in runs:
    assert rc == 1 and _last_line(stderr) == (
        "error: process(es) 1 of 2 run another config than process 0: launch every process "
        "with the same flags and config file")


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(tmp_path):
  """Preemption reaches one host first: JAX's preemption sync point makes every process
  stop after the same step, which is saved; the relaunch resumes from it."""
  args = [*LM, f"--workdir={tmp_path}", "--config.train.num_steps=30",
          "--config.train.log_every=5", "--config.train.checkpoint_every=25",
          "--config.train.eval_every=30"]
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, *args], cwd=REPO,
                            env=_env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for line in procs[0].stdout:
    if line.startswith("step 5/"):
      break
  procs[1].terminate()  # SIGTERM to process 1 only
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [143, 143], outs[0][1][-2000:]
  stopped = [next(l for l in err.splitlines() if l.startswith("stopped by SIGTERM"))
             for _, err in outs]
  assert stopped[0] == stopped[1]
  step = int(stopped[0].split("after step ")[1].split(":")[0])
  assert 5 <= step < 30 and str(step) in os.listdir(tmp_path / "checkpoints")
  runs = _two_processes(args)
  assert [rc for rc, _, _ in runs] == [0, 0], runs[0][2][-2000:]
  assert f"at step {step}" in runs[0][1] and "step 30/30" in runs[0][1]
