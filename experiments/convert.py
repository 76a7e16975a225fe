r"""Hugging Face MoE checkpoints in and out of moe_jax.

Import (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE):
  python -m experiments.convert --from=hf --src=HF_DIR --dst=DST
writes DST/params (an Orbax checkpoint of the parameters), DST/imported.json (the moe_jax
model config and the original config.json), DST/tokenizer.json when HF_DIR has one, and
DST/experiment.py, a config to fine-tune it:
  python -m experiments.train --config=DST/experiment.py --workdir=DST/finetune
and generate from the fine-tuned run (`experiments.generate --workdir=DST/finetune`) or
the HF directory itself (`--workdir=HF_DIR`).
Export (a fine-tuned workdir, or DST itself, back to Hugging Face):
  python -m experiments.convert --to=hf --src=DST/finetune --dst=OUT_DIR
writes config.json + safetensors that transformers loads.
Nothing is written to --dst unless the whole conversion succeeded.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

from absl import app, flags, logging

from experiments import cli
from moe_jax.inference.load import checkpoint_variables
from moe_jax.interop.output_dir import all_or_nothing as _all_or_nothing
from moe_jax.interop.output_dir import fresh_dst as _fresh_dst
from moe_jax.interop.hf import load_hf, read_hf_config, save_hf

_FROM = flags.DEFINE_enum("from", None, ["hf"], "import from this format")
_TO = flags.DEFINE_enum("to", None, ["hf"], "export to this format")
_SRC = flags.DEFINE_string("src", None, "import: HF directory; export: a workdir or import")
_DST = flags.DEFINE_string("dst", None, "output directory (must not exist or be empty)")

IMPORTED = "imported.json"
EXPERIMENT = '''"""Fine-tune the checkpoint imported from {src} (written by experiments.convert).

  python -m experiments.train --config={dst}/experiment.py --workdir={dst}/finetune
Variants and fields: experiments/configs/imported.py.
"""
from experiments.configs import imported


def get_config(arg=None):
  return imported.get_config({dst!r}, arg)
'''


def import_hf(src: str, dst: str) -> None:
  import orbax.checkpoint as ocp  # noqa: PLC0415

  _fresh_dst(dst)
  model, variables = load_hf(src)  # every check first: nothing is written on a bad checkpoint
  hf_config = read_hf_config(src)
  with _all_or_nothing(dst) as tmp:
    with ocp.StandardCheckpointer() as checkpointer:  # saves in the background: wait
      checkpointer.save(os.path.join(tmp, "params"), variables)
      checkpointer.wait_until_finished()
    with open(os.path.join(tmp, IMPORTED), "w") as f:
      json.dump({"model": model, "hf_config": hf_config, "source": os.path.abspath(src)}, f,
                indent=1)
    if os.path.exists(os.path.join(src, "tokenizer.json")):
      shutil.copy(os.path.join(src, "tokenizer.json"), tmp)
    with open(os.path.join(tmp, "experiment.py"), "w") as f:
      f.write(EXPERIMENT.format(src=os.path.abspath(src), dst=os.path.abspath(dst)))
  n = sum(x.size for x in __import__("jax").tree.leaves(variables["params"]))
  print(f"imported {hf_config['model_type']} ({n / 1e6:.2f}M parameters, "
        f"{len(model['moe_layers'])} MoE layers of {model['moe']['num_experts']} experts) to "
        f"{dst}; fine-tune: python -m experiments.train --config={dst}/experiment.py "
        f"--workdir={dst}/finetune")


def export_hf(src: str, dst: str) -> None:
  """`src`: an import (DST of --from=hf) or a workdir trained from one."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  _fresh_dst(dst)
  imported_json = os.path.join(src, IMPORTED)
  config_json = os.path.join(src, "config.json")
  if os.path.exists(imported_json):
    with open(imported_json) as f:
      record = json.load(f)
    variables = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(src, "params")))
  elif os.path.exists(config_json):
    with open(config_json) as f:
      config = json.load(f)
    init = (config.get("train") or {}).get("init_params")
    if not init:
      raise ValueError(f"{src} was not trained from an imported checkpoint (no "
                       "train.init_params): there is no Hugging Face config to export to")
    with open(os.path.join(os.path.dirname(init), IMPORTED)) as f:
      record = json.load(f)
    record["model"] = config["model"]
    _, variables = checkpoint_variables(src)
  else:
    raise ValueError(f"{src} is neither an import ({IMPORTED}) nor a workdir (config.json)")
  with _all_or_nothing(dst) as tmp:
    files = save_hf(record["model"], variables, tmp, record["hf_config"])
    if os.path.exists(os.path.join(src, "tokenizer.json")):
      shutil.copy(os.path.join(src, "tokenizer.json"), tmp)
  print(f"exported {record['hf_config']['model_type']} to {dst}: {', '.join(files)}")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    if bool(_FROM.value) == bool(_TO.value):
      raise ValueError("give exactly one of --from=hf (import) or --to=hf (export)")
    if not _SRC.value or not _DST.value:
      raise ValueError("--src and --dst are required")
    (import_hf if _FROM.value else export_hf)(_SRC.value, _DST.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  cli.run(main)
