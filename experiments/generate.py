r"""Generate text (or token ids) from a trained workdir or a Hugging Face MoE checkpoint.

  python -m experiments.generate --workdir=/tmp/lm_tiny --prompt="def main(" \
      --max_new_tokens=64 --temperature=0.8 --top_p=0.95
  python -m experiments.generate --workdir=HF_DIR --prompt_ids=1,15,27 --max_new_tokens=8

--steer=LAYER:EXPERT=BIAS biases the router (experiments.analyze explains it).
Several --prompt (or --prompt_ids) flags decode as one batch (left-padded). One prompt
streams its tokens as they come. Greedy unless --temperature > 0. Bad input: one line.
"""
from __future__ import annotations

import sys

from absl import flags

from experiments import cli
from experiments.cli import one_line_errors
from moe_jax.inference import Generator, SamplingConfig
from moe_jax.inference.load import load_for_generation

_WORKDIR = flags.DEFINE_string("workdir", None, "moe_jax workdir or Hugging Face directory")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "prompt text (repeat for a batch)")
_PROMPT_IDS = flags.DEFINE_multi_string("prompt_ids", [], "comma-separated token ids")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "tokens to generate per prompt")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0: all)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus: smallest set with this probability")
_STOP = flags.DEFINE_list("stop_tokens", [], "token ids that end a row (included)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_STEER = flags.DEFINE_multi_string("steer", [], "LAYER:EXPERT=BIAS added to that expert's "
                                   "router logit (MoE layer index from 0; see experiments.analyze)")


def _ids(text: str) -> list[int]:
  try:
    ids = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"--prompt_ids={text!r} must be comma-separated integers") from None
  if not ids:
    raise ValueError("--prompt_ids is empty")
  return ids


def run() -> list[list[int]]:
  if not _WORKDIR.value:
    raise ValueError("--workdir is required (a moe_jax workdir or a Hugging Face directory)")
  if not _PROMPT.value and not _PROMPT_IDS.value:
    raise ValueError("give --prompt=TEXT or --prompt_ids=1,2,3")
  sampling = SamplingConfig(temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                            top_p=_TOP_P.value, max_new_tokens=_MAX_NEW.value,
                            stop_tokens=tuple(int(s) for s in _STOP.value), seed=_SEED.value)
  model, variables, tokenizer, what = load_for_generation(_WORKDIR.value, _STEP.value)
  if _STEER.value:  # router steering (moe_jax.analysis.steering)
    from moe_jax.analysis.steering import parse_steer, steering_variables  # noqa: PLC0415
    variables = {**variables, **steering_variables(variables["params"],
                                                   parse_steer(_STEER.value))}
  if _PROMPT.value and tokenizer is None:
    raise ValueError(f"{_WORKDIR.value} has no tokenizer (tokenizer.json): use --prompt_ids")
  prompts = [tokenizer.encode_prompt(p) for p in _PROMPT.value] + [_ids(p) for p in
                                                                  _PROMPT_IDS.value]
  vocab = int(model.get("vocab_size", 0))
  bad = [i for p in prompts for i in p if not 0 <= i < vocab]
  if bad:
    raise ValueError(f"token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
  print(f"generating from {what}: {len(prompts)} prompt(s), up to {sampling.max_new_tokens} "
        "new tokens each", file=sys.stderr, flush=True)
  show = (lambda ids: tokenizer.decode(ids)) if tokenizer else (lambda ids: " ".join(map(str, ids)))
  stream = None
  if len(prompts) == 1:  # one prompt: print each token as it comes
    state = {"text": ""}

    def stream(step_ids):
      if step_ids[0] < 0:
        return
      state.setdefault("ids", []).append(int(step_ids[0]))
      text = show(state["ids"])
      print(text[len(state["text"]):] if tokenizer else f"{int(step_ids[0])} ", end="",
            flush=True)
      state["text"] = text
  outs = Generator(model, variables)(prompts, sampling, on_tokens=stream)
  if stream:
    print(flush=True)
  else:
    for i, out in enumerate(outs):
      print(f"[{i}] {show(out)}", flush=True)
  return outs


main = one_line_errors(run)


if __name__ == "__main__":
  cli.run(main)
