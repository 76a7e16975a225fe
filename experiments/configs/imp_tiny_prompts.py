r"""imp_tiny_prompts: imp_tiny with a routed mixture of soft prompts (SMoP) on its encoder.

Every input (image patches, clip tubelets, spectrogram patches, text bytes) gets one of
a pool of 8 soft prompts of 4 tokens (top-1, weighted by its router probability, routed
on the mean-pooled token embeddings; moe_jax/nn/prompts.py) prepended before the shared
encoder; the prompt's positions are not pooled. Prompt tuning of a trained IMP:
  python -m experiments.train --config=experiments/configs/imp_tiny_prompts.py \
    --workdir=/tmp/imp_prompts --config.train.init_params=DIR
with DIR an imp_tiny run's params; optimizer.trainable=("prompts/", "classifier_") trains
the prompts, their router and the classifier heads only (set it to () to train everything).
Variants: any of imp_tiny's (`:smoke` for tests, `:hard` for the harder benchmark).
"""
from experiments.configs import imp_tiny
from experiments.configs.fields import expose_fields


def get_config(arg: str | None = None):
  c = imp_tiny.get_config(arg)  # its variants, and its one-line error for unknown ones
  c.model.prompts = dict(num_prompts=8, length=4, k=1, load_balance_weight=1e-2)
  c.optimizer.trainable = ("prompts/", "classifier_")
  c.train.init_params = ""
  expose_fields(c)
  return c
