"""What `experiments.generate` decodes from: a training workdir or a Hugging Face
checkpoint directory, with its tokenizer.

- A Hugging Face directory (config.json with a model_type): imported on the fly
  (moe_jax/interop/hf.py); tokenizer.json, when present, encodes prompts and decodes.
- An import written by `experiments.convert --from=hf` (imported.json, params/).
- A moe_jax workdir (config.json written by experiments.train): the model config from
  it and params + router state from the latest (or a chosen) checkpoint; byte-level text
  (the shipped LM configs), or the workdir's tokenizer.json when one is there.
Without a tokenizer, prompts and outputs are token ids.
"""
from __future__ import annotations

import json
import os
from typing import Any

from moe_jax.tokenizer import ByteTokenizer


class HFTokenizer:
  """tokenizer.json through the `tokenizers` package."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer  # noqa: PLC0415

    self._tok = Tokenizer.from_file(path)

  def encode_prompt(self, text: str) -> list[int]:
    return self._tok.encode(text).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


class BytePrompts(ByteTokenizer):
  def encode_prompt(self, text: str) -> list[int]:
    return self.encode_bytes(text.encode("utf-8")).tolist()


def load_for_generation(workdir: str, step: int | None = None
                        ) -> tuple[dict[str, Any], dict[str, Any], Any, str]:
  """(model config, variables, tokenizer or None, description)."""
  path = os.path.join(workdir, "config.json")
  tokenizer_json = os.path.join(workdir, "tokenizer.json")
  tokenizer = HFTokenizer(tokenizer_json) if os.path.exists(tokenizer_json) else None
  if os.path.exists(os.path.join(workdir, "imported.json")):
    import orbax.checkpoint as ocp  # noqa: PLC0415

    with open(os.path.join(workdir, "imported.json")) as f:
      record = json.load(f)
    variables = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(workdir),
                                                                "params"))
    return (record["model"], variables, tokenizer or _bytes_if_fits(record["model"]),
            f"the {record['hf_config'].get('model_type')} import in {workdir}")
  if not os.path.exists(path):
    raise ValueError(f"{workdir} has no config.json: give a workdir written by "
                     "experiments.train or a Hugging Face checkpoint directory")
  with open(path) as f:
    config = json.load(f)
  if "model_type" in config:
    from moe_jax.interop.hf import load_hf  # noqa: PLC0415

    model, variables = load_hf(workdir)
    return model, variables, tokenizer, f"Hugging Face {config['model_type']} checkpoint"
  if "model" not in config:
    raise ValueError(f"{path} is neither a Hugging Face config (model_type) nor a moe_jax "
                     "experiment config (model)")
  step, variables = checkpoint_variables(workdir, step)
  model = config["model"]
  return model, variables, tokenizer or _bytes_if_fits(model), f"checkpoint {step} of {workdir}"


def checkpoint_variables(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """(step, {"params", and "router_state" when there is one}) of a training workdir's
  latest (or given) checkpoint, read on the host."""
  from moe_jax.train.checkpoint import read_on_host  # noqa: PLC0415

  ckpts = os.path.join(workdir, "checkpoints")
  steps = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) if os.path.isdir(ckpts) else []
  if not steps:
    raise ValueError(f"{workdir} has no checkpoint (checkpoints/<step>)")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"{workdir} has no checkpoint {step}; it has {steps}")
  # As numpy, whatever device layout wrote it (a run on 8 devices read on 1).
  return step, read_on_host(os.path.join(os.path.abspath(ckpts), str(step), "state"))


def _bytes_if_fits(model) -> BytePrompts | None:
  """Byte-level text for models with the byte vocabulary (the shipped LM configs)."""
  vocab = int(model.get("vocab_size", ByteTokenizer.vocab_size))
  return BytePrompts() if vocab == ByteTokenizer.vocab_size else None
