"""python -m experiments.compress on a tiny trained lm workdir: widths under the budget,
metrics of each step, an output other tools read, one-line errors."""
import json
import os
import re
import subprocess
import sys

import pytest

from experiments.configs import lm_tiny, lm_tiny_dense
from moe_jax.inference.load import checkpoint_variables
from moe_jax.train import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compress(*args):
  return subprocess.run([sys.executable, "-m", "experiments.compress", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def _train(config, wd):
  config.train.update(num_steps=2, log_every=2, eval_every=2, checkpoint_every=2,
                      eval_batches=1, tensorboard=False)
  train_and_evaluate(config, str(wd))
  return wd


def test_compress_meets_the_budget_evaluates_each_step_and_writes_a_workdir(tmp_path):
  wd = _train(lm_tiny.get_config("smoke"), tmp_path / "lm")
  out = tmp_path / "small"
  r = compress(f"--workdir={wd}", "--avg_bits=2.5", "--prune_beta=0.9", "--max_batches=1",
               f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  record = json.load(open(out / "compress.json"))
  widths = [x["bits"] for x in record["experts"]]
  assert record["avg_bits"] == pytest.approx(sum(widths) / len(widths))
  assert record["avg_bits"] <= 2.5 + 1e-9
  assert set(widths) <= {2, 3, 4, 8} and len(widths) == 8  # lm_tiny smoke: 1 layer x 8
  # 2.5 bits + a float32 scale per 32 values (1 bit each) against 32 bits: over 8x.
  assert record["expert_bytes"]["packed_bytes"] < record["expert_bytes"]["float_bytes"] / 8
  metrics = record["metrics"]
  assert list(metrics) == ["float", "quantized", "quantized+pruned"]
  assert metrics["float"]["stdlib_lm"]["loss"] != metrics["quantized"]["stdlib_lm"]["loss"]
  assert 0 < metrics["quantized+pruned"]["stdlib_lm"]["moe/pruned_slot_fraction"] < 1
  assert "expert computations skipped by pruning" in r.stdout
  # The output is a workdir: its config prunes, its checkpoint holds the quantized params.
  assert json.load(open(out / "config.json"))["model"]["moe"]["prune_beta"] == 0.9
  step, variables = checkpoint_variables(str(out))
  assert step == 2 and "params" in variables


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
  dense = _train(lm_tiny_dense.get_config("smoke"), tmp_path / "dense")
  for args, message in (
      ([f"--workdir={dense}"], r"holds a dense model \(no model.moe\): nothing to compress$"),
      ([f"--workdir={dense}", "--widths=2,5"], r"^error: 5-bit quantization is not supported; "
                                               r"widths: 2, 3, 4, 8$"),
      ([f"--workdir={dense}", "--avg_bits=9"], r"--avg_bits=9.0 is outside the widths' range: "
                                               r"2 <= avg_bits <= 8$"),
      ([f"--workdir={dense}", "--prune_beta=2"], r"--prune_beta=2.0 must be in \[0, 1\]"),
      ([f"--workdir={tmp_path}"], r"has no config.json"),
      ([f"--workdir={dense}", f"--out={dense}"], r"exists: give a new directory \(nothing is "
                                                 r"overwritten\)$")):
    r = compress(*args)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("error: ") and re.search(message, last), last
  assert not (dense / "compressed").exists()


def test_compress_reads_a_hugging_face_import_and_generate_reads_its_output(tmp_path):
  from experiments import convert
  from moe_jax.inference import Generator, SamplingConfig
  from moe_jax.inference.load import load_for_generation
  dst = str(tmp_path / "qwen3")
  convert.import_hf(os.path.join(REPO, "tests", "interop", "fixtures", "qwen3_moe"), dst)
  r = compress(f"--workdir={dst}", "--avg_bits=4", "--max_batches=1", "--widths=4,8")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"routing of the import in {dst}" in r.stderr
  record = json.load(open(os.path.join(dst, "compressed", "compress.json")))
  assert {x["bits"] for x in record["experts"]} == {4} and len(record["experts"]) == 8
  model, variables, tokenizer, what = load_for_generation(os.path.join(dst, "compressed"))
  assert what.startswith("checkpoint 0 of ")
  out = Generator(model, variables)([[1, 15, 27]], SamplingConfig(max_new_tokens=3))[0]
  assert len(out) == 3
