"""experiments.convert: import -> fine-tune (train.init_params) -> export, and its errors."""
import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import convert
from moe_jax.interop.hf import load_hf
from moe_jax.train import train_and_evaluate
from tests.train.runs import REPO

FIXTURE = os.path.join(REPO, "tests", "interop", "fixtures", "qwen3_moe")


def _experiment(dst, arg):
  spec = importlib.util.spec_from_file_location("experiment", os.path.join(dst, "experiment.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_import_finetune_export_round_trip(tmp_path, family):
  """deepseek_v3 carries router state (the correction bias) through every stage."""
  fixture = os.path.join(REPO, "tests", "interop", "fixtures", family)
  dst, out = str(tmp_path / "imported"), str(tmp_path / "out")
  convert.import_hf(fixture, dst)
  assert sorted(os.listdir(dst)) == ["experiment.py", "imported.json", "params"]
  c = _experiment(dst, "smoke")
  c.optimizer.learning_rate = 1e-12  # two AGD steps that leave the weights where they were
  if c.model.moe.router.get("bias_update_rate"):  # and the correction bias too
    c.model.moe.router.bias_update_rate = 1e-12
  summary = train_and_evaluate(c, str(tmp_path / "ft"))
  assert summary["final_step"] == 2 and np.isfinite(summary["eval"]["stdlib_lm"]["loss"])
  convert.export_hf(str(tmp_path / "ft"), out)
  _, before = load_hf(fixture)
  _, after = load_hf(out)  # the fine-tuned weights, back in Hugging Face form
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  # ...and the import itself exports exactly.
  convert.export_hf(dst, str(tmp_path / "out2"))
  _, again = load_hf(str(tmp_path / "out2"))
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(again)):
    np.testing.assert_array_equal(x, y)


def test_generate_decodes_an_import_like_transformers(tmp_path):
  from moe_jax.inference import Generator, SamplingConfig
  from moe_jax.inference.load import load_for_generation
  dst = str(tmp_path / "imported")
  convert.import_hf(FIXTURE, dst)
  model, variables, tokenizer, what = load_for_generation(dst)
  assert what == f"the qwen3_moe import in {dst}" and tokenizer is not None  # 257 ids: bytes
  ref = np.load(os.path.join(FIXTURE, "reference.npz"))
  prompt = ref["greedy_prompt"][0].tolist()
  want = ref["greedy"][0, len(prompt):].tolist()
  assert Generator(model, variables)([prompt], SamplingConfig(max_new_tokens=len(want)))[0] == want


def test_init_params_that_do_not_fit_are_one_line(tmp_path):
  dst = str(tmp_path / "imported")
  convert.import_hf(FIXTURE, dst)
  c = _experiment(dst, "smoke")
  c.model.moe.expert_hidden_dim = 16
  with pytest.raises(ValueError, match=r"^train.init_params \S+/params does not fit this model: "
                                       r"params/decoder/layers/block_0/moe/experts/w_down_EFD has "
                                       r"shape \(4, 24, 32\) there and \(4, 16, 32\) now; use the "
                                       r"model config it was made with$"):
    train_and_evaluate(c, str(tmp_path / "ft"))


def test_cli_errors_are_one_line_and_write_nothing(tmp_path):
  def cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.convert", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  bad = cli("--from=hf", f"--src={tmp_path}", f"--dst={tmp_path / 'x'}")
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path} has no config.json (a Hugging Face checkpoint directory holds "
      "config.json and *.safetensors)")
  assert not (tmp_path / "x").exists()
  both = cli("--from=hf", "--to=hf", f"--src={FIXTURE}", f"--dst={tmp_path / 'y'}")
  assert both.stderr.strip().splitlines()[-1] == (
      "error: give exactly one of --from=hf (import) or --to=hf (export)")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("mine")
  taken = cli("--from=hf", f"--src={FIXTURE}", f"--dst={tmp_path / 'full'}")
  assert taken.stderr.strip().splitlines()[-1] == (
      f"error: --dst={tmp_path / 'full'} exists and is not empty; give a new directory")
  assert os.listdir(tmp_path / "full") == ["keep.txt"]
