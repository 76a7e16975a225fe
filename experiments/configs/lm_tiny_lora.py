r"""lm_tiny_lora: lm_tiny with every FFN a frozen dense FFN plus routed LoRA experts.

MoLoRA-style parameter-efficient fine-tuning (arXiv:2309.05444; moe_jax/nn/layers/
lora_moe.py): each of the 4 layers is layer "lora_moe" (the dense FFN of width mlp_dim,
frozen, + 4 rank-8 LoRA experts, top-2), and optimizer.trainable=("/lora/",) trains the
adapters and their routers only (2 x 4 x 128 x 8 + 128 x 4 = 8,704 per layer).
Commands (2 CPU cores): a trained dense model (lm_tiny_dense) to start from, its FFNs
moved under the adapters (block_i/mlp -> block_i/moe/mlp) by experiments.upcycle, then
the adapters trained:
  python -m experiments.upcycle --src=/tmp/lm_dense --dst=/tmp/lora_init \
    --config=experiments/configs/lm_tiny_lora.py
  python -m experiments.train --config=experiments/configs/lm_tiny_lora.py --workdir=/tmp/lora \
    --config.train.init_params=/tmp/lora_init/params
Without init_params the frozen model is random.
Variant `:smoke` (2 layers, a few steps) for tests. Any MoE layer option overrides as
usual, e.g. --config.model.moe.expert_hidden_dim=16 (the rank).
"""
from experiments.configs import lm_tiny
from experiments.configs.fields import expose_fields


def get_config(arg: str | None = None):
  c = lm_tiny.get_config("smoke" if arg == "smoke" else None)
  if arg not in (None, "smoke"):
    raise ValueError(f"unknown lm_tiny_lora variant {arg!r}; allowed: smoke")
  c.model.moe_every = 1
  c.model.moe.update(num_experts=4, expert_hidden_dim=8, dispatch="sorted", experts="lora",
                     layer=dict(name="lora_moe", mlp_dim=c.model.mlp_dim))
  c.model.moe.router.k = 2
  c.optimizer.trainable = ("/lora/",)
  c.train.init_params = ""
  expose_fields(c)
  return c
