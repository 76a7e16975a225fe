r"""Fine-tune a checkpoint imported by experiments.convert (DST/experiment.py calls this).

  python -m experiments.train --config=DST/experiment.py --workdir=DST/finetune
  python -m experiments.train --config=DST/experiment.py:smoke --workdir=/tmp/ft_smoke

The model is the imported one (config from DST/imported.json; parameters from DST/params
through train.init_params, each read into its place on the mesh); every field overrides
as usual. The default task is byte-level language modelling on the Python standard
library (the lm_tiny data), which needs a vocabulary of at least 257 ids; for a real
model, give tasks whose text is tokenized with its tokenizer (the `tokenize` transform
takes DST/tokenizer.json) and an AGD mix of your own.
"""
import json
import os

import ml_collections

from experiments.configs.fields import LOADER, RUN_POLICIES, expose_fields, stdlib_lm_task
from moe_jax.tokenizer import ByteTokenizer


def get_config(dst: str, arg: str | None = None) -> ml_collections.ConfigDict:
  with open(os.path.join(dst, "imported.json")) as f:
    record = json.load(f)
  model = record["model"]
  if int(model["vocab_size"]) < ByteTokenizer.vocab_size:
    raise ValueError(f"the imported vocabulary ({model['vocab_size']} ids) is smaller than the "
                     f"byte-level default task's ({ByteTokenizer.vocab_size}): write a config "
                     "with tasks tokenized for this model (see experiments/configs/imported.py)")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.aux_loss_weight = 1.0
  c.model = model
  c.tasks = dict(stdlib_lm=stdlib_lm_task(batch_size=8))
  c.agd = dict(mode="agd", sampler="weighted")
  c.mesh = dict(data=1, fsdp=1, expert=1, model=1)
  c.data = dict(LOADER)
  c.optimizer = dict(learning_rate=1e-4, warmup_steps=10, weight_decay=0.0, grad_clip_norm=1.0,
                     end_lr_factor=0.1)
  c.train = dict(num_steps=200, log_every=20, eval_every=100, checkpoint_every=100,
                 keep_checkpoints=2, eval_batches=10, tensorboard=True, moe_telemetry=True,
                 init_params=os.path.join(os.path.abspath(dst), "params"), **RUN_POLICIES)
  if arg == "smoke":
    c.train.update(num_steps=2, log_every=1, eval_every=2, checkpoint_every=2, eval_batches=1)
    c.tasks.stdlib_lm.source_args = {"seq_len": 32}
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; allowed: smoke")
  c = ml_collections.ConfigDict(c)
  expose_fields(c)
  return c
