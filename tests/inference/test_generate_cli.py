"""experiments.generate on a Hugging Face directory and on a training workdir."""
import os
import subprocess
import sys

import numpy as np

from experiments.configs import lm_tiny
from moe_jax.inference import Generator, SamplingConfig
from moe_jax.inference.load import load_for_generation
from moe_jax.train import train_and_evaluate
from tests.train.runs import REPO

FIXTURE = os.path.join(REPO, "tests", "interop", "fixtures", "qwen2_moe")


def _generate(*args):
  return subprocess.run([sys.executable, "-m", "experiments.generate", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def test_cli_greedy_ids_equal_transformers_and_bad_input_is_one_line(tmp_path):
  ref = np.load(os.path.join(FIXTURE, "reference.npz"))
  prompt = ref["greedy_prompt"][0].tolist()
  want = ref["greedy"][0, len(prompt):].tolist()
  run = _generate(f"--workdir={FIXTURE}", f"--prompt_ids={','.join(map(str, prompt))}",
                  f"--max_new_tokens={len(want)}")
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.split() == [str(i) for i in want]  # streamed, one prompt
  # Router steering with zero bias on every expert of the first MoE layer changes nothing.
  steered = _generate(f"--workdir={FIXTURE}", f"--prompt_ids={','.join(map(str, prompt))}",
                      f"--max_new_tokens={len(want)}", "--steer=0:0,1,2,3=0")
  assert steered.returncode == 0, steered.stderr[-2000:]
  assert steered.stdout.split() == [str(i) for i in want]
  for args, message in (
      ([f"--workdir={tmp_path}", "--prompt=x"], f"error: {tmp_path} has no config.json"),
      ([f"--workdir={FIXTURE}", "--prompt=hello"], "has no tokenizer (tokenizer.json): use "
                                                   "--prompt_ids"),
      ([f"--workdir={FIXTURE}", "--prompt_ids=3,x"], "--prompt_ids='3,x' must be comma-"),
      ([f"--workdir={FIXTURE}", "--prompt_ids=3", "--top_p=0"], "top_p=0.0 must be in (0, 1]"),
      ([f"--workdir={FIXTURE}", "--prompt_ids=3", "--steer=9:0=1"], "steering layer 9 is out "
                                                                   "of range: the model has")):
    bad = _generate(*args)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 1 and message in last and "Traceback" not in bad.stderr, last


def test_generates_from_a_training_workdir_with_byte_prompts(tmp_path):
  c = lm_tiny.get_config("smoke")
  c.train.update(num_steps=2, log_every=2, eval_every=2, checkpoint_every=2, tensorboard=False)
  train_and_evaluate(c, str(tmp_path))
  model, variables, tokenizer, what = load_for_generation(str(tmp_path))
  assert what == f"checkpoint 2 of {tmp_path}" and set(variables) >= {"params"}
  prompt = tokenizer.encode_prompt("def f(")
  assert prompt == [ord(ch) + 1 for ch in "def f("]  # byte ids, as the data pipeline makes
  out = Generator(model, variables)([prompt], SamplingConfig(max_new_tokens=5))[0]
  assert len(out) == 5 and all(0 <= i < 257 for i in out)
  assert isinstance(tokenizer.decode(out), str)


def test_a_tokenizer_json_encodes_prompts_and_decodes_outputs(tmp_path):
  import shutil

  from tokenizers import Tokenizer, models, pre_tokenizers

  hf_dir = tmp_path / "hf"
  shutil.copytree(os.path.join(REPO, "tests", "interop", "fixtures", "qwen3_moe"), hf_dir)
  words = ["def", "main", "(", ")", ":", "return", "x", "[UNK]"] + [f"w{i}" for i in range(249)]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(hf_dir / "tokenizer.json"))
  model, variables, tokenizer, _ = load_for_generation(str(hf_dir))
  assert tokenizer.encode_prompt("def main ( ) :") == [0, 1, 2, 3, 4]
  out = Generator(model, variables)([tokenizer.encode_prompt("def main ( ) :")],
                                    SamplingConfig(max_new_tokens=4))[0]
  assert tokenizer.decode(out) == " ".join(words[i] for i in out)
  run = _generate(f"--workdir={hf_dir}", "--prompt=def main ( ) :", "--max_new_tokens=4")
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.strip() == tokenizer.decode(out)  # streamed text, the same tokens
