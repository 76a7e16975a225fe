"""End to end: train_and_evaluate on shrunk configs, resume after SIGKILL, failures, CLI errors."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from experiments.configs import imp_tiny, lm_tiny
from moe_jax.data import sources
from moe_jax.train.agd import Task
from moe_jax.train import TrainingError, evaluate, train_and_evaluate
from moe_jax.train.trainer import check_vocab

from tests.train.runs import REPO, cli as _cli, final_state as _final_state, flatten as _flatten


def imp_config(tasks=("image_cls", "image_text"), **train):
  c = imp_tiny.get_config("smoke")
  for name in list(c.tasks.keys()):
    if name not in tasks:
      del c.tasks[name]
  for t in c.tasks.values():
    t.batch_size = 8
  c.train.update(train)
  return c


def test_agd_compiles_each_task_once_and_writes_outputs(tmp_path):
  c = imp_config(("image_cls", "audio_cls", "image_text"), num_steps=50, log_every=25,
                 eval_every=50, checkpoint_every=25)
  summary = train_and_evaluate(c, str(tmp_path))
  assert summary["compiles"] == {"image_cls": 1, "audio_cls": 1, "image_text": 1}
  assert set(summary["compile_seconds"]) == {"image_cls", "audio_cls", "image_text"}
  # Eval means over eval_batches=1 batch of 8 examples: whole counts of correct examples.
  for name, key in (("image_cls", "accuracy"), ("image_text", "zero_shot_accuracy")):
    assert summary["eval"][name]["eval_batches"] == 1
    correct = summary["eval"][name][key] * 8
    assert abs(correct - round(correct)) < 1e-6, (name, key, correct)
  assert {"moe/dropped_slot_fraction", "moe/unrouted_token_fraction",
          "moe/max_processed_load"} <= set(summary["eval"]["image_cls"])
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["final_step"] == 50 and on_disk["eval"].keys() == summary["eval"].keys()
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["25", "50"]  # keep_checkpoints=2
  # Every train log line carries each task's loss and the MoE metrics.
  logged = summary["train_history"][-1]
  assert {"train/image_cls/loss", "train/image_text/moe/router_entropy"} <= set(logged)
  # Telemetry (on in imp_tiny): the MoE layer's per-expert load over the window, its
  # max/mean and dead experts, and per-layer dropped fraction and entropy per task.
  layer = "moe_layers/encoder/block_1/moe"
  load = logged[f"{layer}/expert_load"]
  assert len(load) == 4 and abs(sum(load) - 1) < 1e-4
  np.testing.assert_allclose(logged[f"{layer}/max_over_mean_load"], max(load) / np.mean(load),
                             rtol=1e-4)
  assert logged[f"{layer}/dead_experts"] == sum(x == 0 for x in load)
  assert {f"train/image_cls/{layer}/dropped_slot_fraction",
          f"train/image_cls/{layer}/unrouted_token_fraction"} <= set(logged)


def test_mixed_batch_baseline_compiles_once(tmp_path):
  c = imp_config(num_steps=3, log_every=3, eval_every=3, checkpoint_every=3)
  c.agd.mode = "mixed"
  summary = train_and_evaluate(c, str(tmp_path))
  assert summary["compiles"] == {"mixed": 1}
  assert "train/image_text/loss" in summary["train_history"][-1]


def test_one_step_under_mock_tfds(tmp_path):
  c = imp_config(num_steps=1, log_every=1, eval_every=1, checkpoint_every=1)
  c.tasks = {"mnist": dict(kind="classify", source="tfds:mnist:train",
                           eval_source="tfds:mnist:test", modalities=("image",), batch_size=4,
                           image_size=8, source_args={"feature_map": {"image": "image",
                                                                      "label": "label"}})}
  with tfds.testing.mock_data(num_examples=8):
    summary = train_and_evaluate(c, str(tmp_path))
  assert summary["compiles"] == {"mnist": 1}
  assert summary["eval"]["mnist"]["eval_batches"] == 1  # smoke: eval_batches=1 batch of 4
  correct = summary["eval"]["mnist"]["accuracy"] * 4
  assert abs(correct - round(correct)) < 1e-6, correct


class _Batches:
  def __init__(self, batches):
    self.batches = batches

  def epoch_batches(self):
    return iter(self.batches)


def test_evaluate_weights_batches_by_real_examples_up_to_the_limit_and_adds_zero_shot():
  def eval_step(params, batch, task, zero_shot=False):
    del params, task
    return {"zero_shot_accuracy": batch["zs"]} if zero_shot else {"loss": batch["loss"]}

  def b(loss, zs=0.0, valid=(True, True, True, True)):
    return {"loss": np.float32(loss), "zs": np.float32(zs), "valid": np.array(valid)}

  contrast = Task("c", "contrastive", "x", modalities=("image", "text"), class_names=("a", "b"))
  classify = Task("k", "classify", "x", num_classes=2)
  no_text = Task("n", "contrastive", "x", modalities=("image", "audio"))
  iters = {"c": _Batches([b(1.0, 0.5), b(3.0, 1.0, (True, False, False, False)),
                          b(100.0)]),  # past max_batches: never read
           "k": _Batches([{"loss": np.float32(2.0), "label": np.zeros(3)}]),  # no mask: 3 real
           "n": _Batches([b(4.0, 1.0), b(6.0, 1.0)])}
  out = evaluate(eval_step, None, [contrast, classify, no_text], iters, max_batches=2)
  # c: 4 real examples at loss 1, one at loss 3 (the fill of the second batch counts 0).
  assert out == {"c": {"loss": pytest.approx(7 / 5), "zero_shot_accuracy": pytest.approx(3 / 5),
                       "eval_batches": 2, "eval_examples": 5},
                 "k": {"loss": 2.0, "eval_batches": 1, "eval_examples": 3},
                 "n": {"loss": 5.0, "eval_batches": 2, "eval_examples": 8}}
  everything = evaluate(eval_step, None, [contrast], iters)  # max_batches=0: the whole split
  assert everything["c"]["eval_batches"] == 3 and everything["c"]["eval_examples"] == 9


def test_a_tokenizer_larger_than_the_embedding_is_one_line():
  task = Task("t", "classify", "x", modalities=("text",), num_classes=2,
              transforms=("tokenize(8)",))
  check_vocab({"vocab_size": 257}, [task])  # bytes: 257 ids fit
  with pytest.raises(ValueError, match=r"task 't': its tokenizer has 257 ids but "
                                       r"config.model.vocab_size=100; set --config.model.vocab"):
    check_vocab({"vocab_size": 100}, [task])


class NanAfter:
  """digits_image whose 5th and later reads are NaN: init reads 1, steps 1-3 read 3 more."""

  splits = ("train", "test")
  reads = 0

  def __init__(self, split="train"):
    self._base = sources.SOURCES["digits_image"](split)
    self.class_names, self.num_classes = self._base.class_names, self._base.num_classes

  def __len__(self):
    return len(self._base)

  def __getitem__(self, i):
    ex = dict(self._base[i])
    NanAfter.reads += 1
    if NanAfter.reads >= 5:
      ex["image"] = ex["image"] * np.nan
    return ex


def test_nan_loss_stops_with_step_and_task_and_keeps_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setitem(sources.SOURCES, "nan_digits", NanAfter)
  monkeypatch.setattr(NanAfter, "reads", 0)
  c = imp_config(("image_cls",), num_steps=10, log_every=1, eval_every=100, checkpoint_every=1)
  c.tasks.image_cls.source = "nan_digits:test"
  c.tasks.image_cls.eval_source = None
  c.tasks.image_cls.batch_size = 1
  with pytest.raises(TrainingError, match=r"non-finite values at step (\d+) \(task "
                                          r"image_cls\)") as e:
    train_and_evaluate(c, str(tmp_path))
  assert "non-finite values at step 4 (task image_cls): " in str(e.value)
  assert " loss=nan," in str(e.value) and " grad_norm=nan," in str(e.value)
  assert "first non-finite gradient group: " in str(e.value)
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [2, 3]  # keep 2
  assert "last good checkpoint (step 3) is untouched" in str(e.value)


def test_skip_step_keeps_the_state_counts_skips_and_stops_after_too_many(tmp_path, monkeypatch):
  monkeypatch.setitem(sources.SOURCES, "nan_digits", NanAfter)
  monkeypatch.setattr(NanAfter, "reads", 0)
  c = imp_config(("image_cls",), num_steps=10, log_every=1, eval_every=100, checkpoint_every=1,
                 nonfinite="skip_step", max_consecutive_skips=2, keep_checkpoints=3)
  c.tasks.image_cls.source = "nan_digits:test"
  c.tasks.image_cls.eval_source = None
  c.tasks.image_cls.batch_size = 1
  # Steps 4, 5 skipped (every batch from the 5th read is NaN), the third in a row stops.
  with pytest.raises(TrainingError, match=r"3 non-finite steps in a row up to step 6 \(task "
                                          r"image_cls, train.max_consecutive_skips=2\)"):
    train_and_evaluate(c, str(tmp_path))
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [3, 4, 5]
  good, skipped = _final_state(tmp_path, 3), _final_state(tmp_path, 5)
  for (k, x), (_, y) in zip(_flatten(good["params"]), _flatten(skipped["params"])):
    np.testing.assert_array_equal(x, y, err_msg=k)  # skipped steps changed nothing
  assert int(skipped["step"]) == 5  # ...but the step (data, rng) moved on


def test_unwritable_workdir_is_one_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(TrainingError, match=r"workdir '.*file/run' is not writable"):
    train_and_evaluate(imp_config(), str(blocker / "run"))


def test_cli_reports_unknown_config_keys_and_missing_data(tmp_path):
  bad_key = _cli("--config=experiments/configs/imp_tiny.py", "--config.model.moe.num_expertz=3",
                 f"--workdir={tmp_path}")
  assert bad_key.returncode != 0
  last = bad_key.stderr.strip().splitlines()[-1]
  assert last.startswith("error: unknown config key 'num_expertz'") and "num_experts" in last
  assert "Traceback" not in bad_key.stderr
  no_data = _cli("--config=experiments/configs/imp_tiny.py:smoke",
                 "--config.tasks.image_cls.source=tfds:not_a_real_dataset_xyz",
                 f"--workdir={tmp_path}")
  assert no_data.returncode != 0 and "Traceback" not in no_data.stderr
  assert "not_a_real_dataset_xyz" in no_data.stderr.strip().splitlines()[-1]


def _final_params(workdir, step):
  return _final_state(workdir, step)["params"]


def _start(args, workdir, env):
  return subprocess.Popen([sys.executable, "-m", "experiments.train", *args,
                           f"--workdir={workdir}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc, prefix, timeout=300):
  """Reads the child's stdout until a line starts with `prefix` (the run is mid-way)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    if line.startswith(prefix):
      return line
  raise AssertionError(f"no line starting with {prefix!r}")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_the_step_and_resume_exactly(tmp_path, sig, code):
  """Preemption (SIGTERM) or Ctrl-C between checkpoints: the step in flight is saved, one
  line says so, the exit code says which signal; the rerun resumes from that step and ends
  with the parameters of an uninterrupted run."""
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  n = 100  # the schedule depends on num_steps: every run trains the same 100
  args = ["--config=experiments/configs/lm_tiny.py:smoke", f"--config.train.num_steps={n}",
          "--config.train.checkpoint_every=1000", "--config.train.eval_every=1000",
          "--config.train.log_every=2"]
  parts = tmp_path / "parts"
  proc = _start(args, parts, env)
  _wait_for_line(proc, f"step 4/{n}")  # past compiling, long before the first checkpoint
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == code, err[-2000:]
  last = err.strip().splitlines()[-1]
  match = re.fullmatch(rf"stopped by {sig.name} after step (\d+): checkpoint \1 saved; run the "
                       r"same command to resume", last)
  assert match, last
  step = int(match.group(1))
  assert 4 <= step < n and "Traceback" not in err
  assert sorted(os.listdir(parts / "checkpoints")) == [str(step)]  # no temporary directory left
  rerun = _cli(*args, f"--workdir={parts}", env=env)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert f"resumed from {parts}/checkpoints at step {step}" in rerun.stdout
  whole = tmp_path / "whole"
  assert _cli(*args, f"--workdir={whole}", env=env).returncode == 0
  a = dict(_flatten(_final_params(whole, n)))
  b = dict(_flatten(_final_params(parts, n)))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # summary.json keeps both segments; TensorBoard is told to drop re-run steps.
  summary = json.loads((parts / "summary.json").read_text())
  assert [(s["start_step"], s["end_step"], s["status"]) for s in summary["segments"]] == [
      (0, step, f"stopped by {sig.name}"), (step, n, "finished")]
  last = summary["segments"][-1]
  assert last["config"]["train"]["num_steps"] == n and "jax" in last["packages"]
  assert summary["resumed_from"] == step and summary["final_step"] == n
  assert step + 1 in _purge_steps(parts)


def _events(path):
  """(step, event) of a TensorBoard event file: TFRecord framing around Event protos."""
  from tensorboardX.proto import event_pb2
  data = open(path, "rb").read()
  out, i = [], 0
  while i + 12 <= len(data):
    (length,) = np.frombuffer(data[i:i + 8], "<u8")
    event = event_pb2.Event.FromString(data[i + 12:i + 12 + int(length)])
    out.append(event)
    i += 12 + int(length) + 4
  return out


def _purge_steps(workdir):
  """Steps of the SessionLog START events (TensorBoard hides earlier points from there)."""
  from tensorboardX.proto import event_pb2
  steps = []
  for path in glob.glob(str(workdir / "events.out.tfevents.*")):
    steps += [e.step for e in _events(path)
              if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START]
  return steps


def test_a_second_ctrl_c_stops_at_once_and_the_cli_says_so_in_one_line(monkeypatch, capsys):
  """Signals to this very process (deterministic; POSIX merges two signals sent to a busy
  child at once), then the CLI's handling of the resulting KeyboardInterrupt."""
  from experiments import train as cli
  from moe_jax.train.preemption import StopRequests
  before = signal.getsignal(signal.SIGINT)  # SIG_IGN when launched in the background
  with StopRequests() as stops:
    assert stops.requested(0) is None
    os.kill(os.getpid(), signal.SIGINT)  # first Ctrl-C: a request, no exception
    time.sleep(0.01)
    assert stops.requested(1) == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)  # second: at once
      time.sleep(0.01)
  assert signal.getsignal(signal.SIGINT) is before  # handlers restored

  def interrupted_again(config, workdir):
    raise KeyboardInterrupt

  monkeypatch.setattr(cli, "train_and_evaluate", interrupted_again)
  flag = lambda value: __import__("types").SimpleNamespace(value=value)  # unparsed in pytest
  monkeypatch.setattr(cli, "_CONFIG", flag({}))
  monkeypatch.setattr(cli, "_WORKDIR", flag("unused"))
  monkeypatch.setattr(cli, "_CONFIG_HELP", flag(False))
  with pytest.raises(SystemExit) as e:
    cli.main(["train"])
  assert e.value.code == 130
  assert capsys.readouterr().err.strip().splitlines() == [
      "interrupted again: exited at once without saving; a rerun resumes from the last "
      "committed checkpoint (if any)"]


@pytest.mark.parametrize("section, key, value, message", [
    ("optimizer", "learning_rate", -1e-3, r"optimizer.learning_rate=-0.001 must be a number > 0"),
    ("optimizer", "warmup_steps", -1, r"optimizer.warmup_steps=-1 is out of range"),
    ("optimizer", "weight_decay", -0.1, r"optimizer.weight_decay=-0.1 must be a number >= 0"),
    ("train", "num_steps", 0, r"train.num_steps=0 is out of range; allowed: 1 <= "),
    ("train", "num_steps", -5, r"train.num_steps=-5 is out of range"),
    ("train", "eval_every", 0, r"train.eval_every=0 is out of range"),
    ("train", "log_every", 0, r"train.log_every=0 is out of range"),
    ("train", "checkpoint_every", 0, r"train.checkpoint_every=0 is out of range"),
    ("train", "eval_batches", -1, r"train.eval_batches=-1 is out of range"),
])
def test_bad_optimizer_and_train_fields_fail_before_device_work(tmp_path, section, key, value,
                                                                 message):
  c = lm_tiny.get_config("smoke")
  c[section][key] = value
  with pytest.raises(ValueError, match=message):
    train_and_evaluate(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")  # nothing was built or written


def test_every_shipped_config_and_variant_passes_the_train_checks():
  from experiments.configs import lm_tiny_dense, tfds_imp
  from moe_jax.train.trainer import check_train_config
  variants = {imp_tiny: [None, "smoke", "mixed", "task_routed", "task_routed_smoke",
                         *imp_tiny.HARD_VARIANTS],
              lm_tiny: [None, "smoke", "deepseek", "dense_to_sparse"], lm_tiny_dense: [None]}
  for module, args in variants.items():
    for arg in args:
      check_train_config(module.get_config(arg))
  check_train_config(tfds_imp.get_config("image=x,audio=y,text=z"))


def test_progress_rate_and_eta_leave_out_excluded_time(monkeypatch):
  from moe_jax.train import metrics
  clock = iter([100.0, 130.0, 150.0])  # created at 100; updates at 130 and 150
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
  progress = metrics.Progress(0, 110)
  progress.exclude(20.0)  # e.g. compiling: 10 steps took 30 s of which 20 s compiling
  rate, eta = progress.update(10)
  assert rate == pytest.approx(1.0) and eta == "1m40s"  # 100 steps left at 1 step/s
  rate, eta = progress.update(30)  # nothing excluded: 20 steps in 20 s
  assert rate == pytest.approx(1.0) and eta == "1m20s"


def test_console_says_when_each_task_compiles_and_when_eval_runs(tmp_path, capsys):
  c = lm_tiny.get_config("smoke")
  c.train.update(num_steps=4, log_every=2, eval_every=4, checkpoint_every=4, tensorboard=False)
  train_and_evaluate(c, str(tmp_path))
  lines = capsys.readouterr().out.splitlines()
  order = [next(i for i, line in enumerate(lines) if line.startswith(prefix)) for prefix in (
      "task stdlib_lm: compiling (first step)",
      "task stdlib_lm: compiled and ran its first step in ",
      "step 2/4 ",
      "eval at step 4: 1 task(s), up to 1 batches each",
      "  eval stdlib_lm @ 4: ",
      "eval at step 4 done in ")]
  assert order == sorted(order)
  assert sum(line.startswith("task stdlib_lm: compiling") for line in lines) == 1


def test_resume_names_a_changed_parameter_shape_and_lists_changed_fields(tmp_path, capsys):
  c = lm_tiny.get_config("smoke")
  c.train.update(num_steps=2, log_every=1, eval_every=2, checkpoint_every=2, tensorboard=False)
  train_and_evaluate(c, str(tmp_path))
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["moe"]["num_experts"] == 8 and saved["train"]["num_steps"] == 2
  capsys.readouterr()
  # Another learning rate and more steps: trains on, saying what changed.
  c.train.num_steps = 4
  c.optimizer.learning_rate = 5 * c.optimizer.learning_rate
  train_and_evaluate(c, str(tmp_path))
  out = capsys.readouterr().out
  assert "warning: resuming with 2 changed config field(s): optimizer.learning_rate: " in out
  assert "train.num_steps: 2 -> 4" in out
  # Switching strict mode on (a run-control field, like log_every) is not itself refused...
  c.train.on_config_change, c.train.log_every = "error", 2
  train_and_evaluate(c, str(tmp_path))
  # ...but then a change of what the run computes stops it.
  c.train.num_steps = 6
  with pytest.raises(ValueError, match=r"resuming .* with a changed config \(1 field\(s\)\): "
                                       r"train.num_steps: 4 -> 6 \(train.on_config_change=warn"):
    train_and_evaluate(c, str(tmp_path))
  # Half the experts: one line naming the parameter and both shapes, not Orbax's error;
  # config.json still holds the config that wrote the checkpoint.
  c.train.on_config_change = "warn"
  c.model.moe.num_experts = 4
  with pytest.raises(ValueError, match=r"checkpoint 4 does not fit this model: params/decoder/"
                                       r"\S+ has shape \(8, 256, 128\) there and \(4, 256, 128\) now"):
    train_and_evaluate(c, str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["model"]["moe"]["num_experts"] == 8
  # A fresh run from this one's parameters (train.init_params=WORKDIR: its latest
  # checkpoint): at a vanishing learning rate they come back unchanged, step fresh.
  with pytest.raises(ValueError, match=r"^train.init_params \S+/checkpoints/4/state does not "
                                       r"fit this model: params/decoder/\S+ has shape "
                                       r"\(8, 256, 128\) there and \(4, 256, 128\) now"):
    c.train.init_params = str(tmp_path)
    train_and_evaluate(c, str(tmp_path / "refused"))
  c.model.moe.num_experts, c.train.num_steps, c.optimizer.learning_rate = 8, 1, 1e-30
  train_and_evaluate(c, str(tmp_path / "fine_tune"))
  want, got = _final_state(str(tmp_path), 4), _final_state(str(tmp_path / "fine_tune"), 1)
  assert int(got["step"]) == 1
  for (path, a), (_, b) in zip(_flatten(want["params"]), _flatten(got["params"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-20, err_msg=path)


@pytest.mark.parametrize("damage", ["truncate the array data", "empty _METADATA"])
def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capfd,
                                                                         damage):
  c = lm_tiny.get_config("smoke")
  c.train.update(num_steps=4, log_every=2, eval_every=4, checkpoint_every=2, tensorboard=False)
  train_and_evaluate(c, str(tmp_path))
  step4 = tmp_path / "checkpoints" / "4" / "state"
  if damage == "empty _METADATA":
    (step4 / "_METADATA").write_text("")
  else:
    for path in glob.glob(str(step4 / "**" / "d" / "*"), recursive=True):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  capfd.readouterr()
  c.train.num_steps = 6
  summary = train_and_evaluate(c, str(tmp_path))
  out, err = capfd.readouterr()
  assert re.search(r"warning: checkpoint 4 is unreadable \(\w+: .*; details in \S+/restore_"
                   r"error_4.log\); moved to \S+/4\.unreadable, resuming from 2", out), out
  # TensorStore's reader threads' tracebacks went into that file, not onto the console.
  assert "Traceback" not in out + err and "Exception ignored" not in out + err
  assert "Traceback" in (tmp_path / "restore_error_4.log").read_text()
  assert summary["resumed_from"] == 2 and summary["final_step"] == 6
  # 4 set aside, then 4 and 6 saved anew (keep 2: step 2 went)
  assert set(os.listdir(tmp_path / "checkpoints")) == {"4.unreadable", "4", "6"}


def test_no_readable_checkpoint_is_one_line_never_a_fresh_start(tmp_path):
  c = lm_tiny.get_config("smoke")
  c.train.update(num_steps=2, log_every=2, eval_every=2, checkpoint_every=2, tensorboard=False)
  train_and_evaluate(c, str(tmp_path))
  (tmp_path / "checkpoints" / "2" / "state" / "_METADATA").write_text("")
  c.train.num_steps = 4
  with pytest.raises(TrainingError, match=r"no checkpoint in .* restores \(steps \[2\]; "
                                          r"newest: \w+: .*\); nothing was moved"):
    train_and_evaluate(c, str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == ["2"]  # left where it was


def test_two_fresh_runs_with_one_seed_give_bit_identical_loss_curves(tmp_path):
  def run(name, seed=0):
    c = lm_tiny.get_config("smoke")
    c.seed = seed
    c.train.update(num_steps=6, log_every=1, eval_every=6, checkpoint_every=6,
                   tensorboard=False)
    history = train_and_evaluate(c, str(tmp_path / name))["train_history"]
    return [(h["step"], h["train/stdlib_lm/loss"], h["train/stdlib_lm/grad_norm"])
            for h in history]

  first, second = run("a"), run("b")
  assert len(first) == 6 and first == second  # exact floats, not approximately
  assert run("c", seed=1) != first  # the seed does matter


def test_every_model_stack_and_moe_field_is_in_every_shipped_config():
  import dataclasses
  from experiments.configs import lm_tiny_dense, tfds_imp
  from moe_jax.config import MoEConfig, TransformerConfig
  from moe_jax.models import MODELS
  configs = [imp_tiny.get_config(a) for a in (None, "smoke", "mixed", "task_routed", "hard")]
  configs += [lm_tiny.get_config(a) for a in (None, "smoke", "deepseek")]
  configs += [lm_tiny_dense.get_config(), tfds_imp.get_config("image=x")]
  for c in configs:
    model_cls = MODELS[c.model.name][1]
    for cls, node in ((model_cls, c.model), (TransformerConfig, c.model)) + (
        ((MoEConfig, c.model.moe),) if c.model.moe else ()):
      missing = {f.name for f in dataclasses.fields(cls)} - {
          "moe", "mla", "prompts", "encoder", "decoder"} - set(node.keys())  # sub-configs
      assert not missing, (c.model.name, cls.__name__, missing)
    if c.model.moe:  # the router too, as a dict of all its options
      from moe_jax.nn.routing import ROUTERS
      from moe_jax.nn.routing.base import router_options
      router_cls = ROUTERS.get(c.model.moe.router.name)
      missing = {o for o in router_options(router_cls)
                 if getattr(next(f for f in dataclasses.fields(router_cls) if f.name == o),
                            "default", None) is not None} - set(c.model.moe.router.keys())
      assert not missing, (c.model.name, router_cls.__name__, missing)
      assert c.model.moe.layer.name == "moe"  # the layer as a dict too (its options)
    if not c.model.get("mla"):  # the q/k/v attention as a dict too
      assert c.model.attention.name == "mha"
    assert all("data_dir" in t.source_args for t in c.tasks.values())


def test_fields_the_file_leaves_out_override_from_the_command_line(tmp_path):
  # head_dim and group_size default to None (typed placeholders), remat to False; the run
  # stops at the train checks, after the overrides were accepted.
  result = _cli("--config=experiments/configs/imp_tiny.py", "--config.model.head_dim=8",
                "--config.model.moe.group_size=64", "--config.model.remat=True",
                "--config.model.moe.num_shared_experts=1", "--config.train.num_steps=0",
                "--config.model.moe.router.jitter=0.01",  # the file names the router only
                "--config.tasks.image_cls.source_args.data_dir=/data/tfds",
                f"--workdir={tmp_path}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: train.num_steps=0 is out of range; allowed: 1 <= train.num_steps <= inf")
  # A key at the wrong level names where it is; a value is not a group of keys.
  wrong = _cli("--config=experiments/configs/lm_tiny.py:smoke", "--config.model.moe.k=4",
               f"--workdir={tmp_path}")
  assert wrong.stderr.strip().splitlines()[-1].startswith(
      "error: unknown config key 'k' in --config.model.moe.k; it is at "
      "--config.model.moe.router.k; valid keys of config.model.moe: ")
  value = _cli("--config=experiments/configs/lm_tiny.py:smoke", "--config.model.name.x=1",
               f"--workdir={tmp_path}")
  assert value.stderr.strip().splitlines()[-1] == (
      "error: --config.model.name.x: config.model.name is the value 'lm', not a group of "
      "keys, so it has no 'x'")


def test_config_help_and_config_file_errors_are_one_line(tmp_path):
  helped = _cli("--config=experiments/configs/imp_tiny.py:smoke", "--config_help",
                "--config.model.moe.group_size=32")
  assert helped.returncode == 0, helped.stderr[-2000:]
  assert "Variants: `imp_tiny.py:smoke`" in helped.stdout and "group_size: 32" in helped.stdout
  missing = _cli("--config=experiments/configs/nope.py", f"--workdir={tmp_path}")
  assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [
      "error: config 'experiments/configs/nope.py' could not be loaded: [Errno 2] No such "
      "file or directory: 'experiments/configs/nope.py'"]
  typo = _cli("--config", "experiments/configs/imp_tiny.py", "--config.train.num_stpes=3",
              f"--workdir={tmp_path}")  # the space form of --config
  last = typo.stderr.strip().splitlines()[-1]
  assert typo.returncode == 1 and len(typo.stderr.strip().splitlines()) == 1
  assert last.startswith("error: unknown config key 'num_stpes' in --config.train.num_stpes; "
                         "did you mean 'num_steps'? valid keys of config.train: ")


def test_a_failed_save_is_one_line_and_keeps_the_committed_checkpoints(tmp_path, monkeypatch):
  """Disk full at the second save (root ignores file modes, so the failure is injected
  into the filesystem write Orbax's array handler makes)."""
  import errno
  from moe_jax.train.checkpoint import SaveError
  c = lm_tiny.get_config("smoke")
  c.train.update(num_steps=6, log_every=2, eval_every=6, checkpoint_every=2, tensorboard=False)
  calls = {"n": 0}
  real_save = ocp.CheckpointManager.save

  def disk_full_on_second_save(self, step, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full_on_second_save)
  with pytest.raises(SaveError) as e:
    train_and_evaluate(c, str(tmp_path))
  assert str(e.value).startswith(f"saving checkpoint 4 in {tmp_path}/checkpoints failed (OSError:")
  assert "No space left on device); the last committed checkpoint is 2" in str(e.value)
  assert "\n" not in str(e.value)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  summary = train_and_evaluate(c, str(tmp_path))  # the rerun resumes from the committed step
  assert summary["resumed_from"] == 2


def test_a_background_save_failure_surfaces_at_the_next_save_naming_its_step(tmp_path,
                                                                            monkeypatch):
  import jax.numpy as jnp
  from moe_jax.train.checkpoint import Checkpointer, SaveError
  ckpt = Checkpointer(str(tmp_path), keep=3, async_save=True)
  state = {"w": jnp.ones(3)}
  ckpt.save(1, state, {"t": {"position": 1}})
  ckpt.wait()
  ckpt.save(2, state, {"t": {"position": 2}})  # returns while the write goes on

  def failed():
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(ckpt._manager, "check_for_errors", failed)  # the write of 2 failed
  with pytest.raises(SaveError, match=r"^saving checkpoint 2 in .* failed \(OSError: \[Errno "
                                      r"28\] No space left on device\); the last committed "
                                      r"checkpoint is 1$"):
    ckpt.save(3, state, {"t": {"position": 3}})
  monkeypatch.undo()
  ckpt.close()


def test_task_routed_imp_trains_with_one_gate_per_task(tmp_path):
  c = imp_tiny.get_config("task_routed_smoke")
  for name in list(c.tasks.keys()):
    if name not in ("image_cls", "image_text"):
      del c.tasks[name]
  c.train.update(num_steps=4, log_every=2, eval_every=4, checkpoint_every=4)
  summary = train_and_evaluate(c, str(tmp_path))
  assert summary["compiles"] == {"image_cls": 1, "image_text": 1}
  state = _final_state(str(tmp_path), 4)
  gates = state["params"]["encoder"]["layers"]["block_1"]["moe"]["router"]["w_per_value_DE"]
  assert gates.shape == (5, 64, 4)  # one gate per configured task (ids from config order)
  assert summary["eval"]["image_cls"]["eval_batches"] == 1
