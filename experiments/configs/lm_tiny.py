r"""lm_tiny: a byte-level decoder-only MoE language model on the Python standard library.

Command (2 CPU cores):
  python -m experiments.train --config=experiments/configs/lm_tiny.py --workdir=/tmp/lm_tiny
Variant `lm_tiny.py:deepseek`: a small DeepSeek-V3-style MoE layer (sigmoid scoring,
group-limited top-k, aux-loss-free bias balancing, a shared expert).
Variant `lm_tiny.py:dense_to_sparse`: EvoMoE's dense-to-sparse gate (arXiv:2112.14397),
dropless "sorted" dispatch (every expert is a slot until the gate sparsifies).
Compare with the dense model of the same active parameters per token:
  python -m experiments.train --config=experiments/configs/lm_tiny_dense.py --workdir=/tmp/lm_dense

Data: the stdlib's own .py files (fixed held-out split by file; see
moe_jax/data/text.py), random 128-byte windows.

Results (2 CPU cores, 2026-11-30, 800 steps, 2.30M parameters): validation loss
1.322 nats/byte (1.907 bits/byte), next-byte accuracy 0.642.
"""
import ml_collections

from experiments.configs.fields import LOADER, RUN_POLICIES, expose_fields, stdlib_lm_task

# Every MoE layer routes each token to K=2 experts of width 256: 512 active hidden
# units, the dense FFN width (mlp_dim) used everywhere in lm_tiny_dense.
# The top_k options this file sets; expose_fields adds the router's others at their
# defaults, so each can be overridden (--config.model.moe.router.jitter=0.01).
ROUTER = dict(name="top_k", k=2, score="softmax", renormalize=True, routed_scaling_factor=1.0,
              n_group=1, topk_group=1, bias_update_rate=0.0, balance_count="slots",
              balance_scope="batch")
MOE = dict(num_experts=8, expert_hidden_dim=256, dispatch="einsum", router=ROUTER,
           capacity_factor=1.25, eval_capacity_factor=2.0, group_size=256,
           load_balance_weight=1e-2, z_loss_weight=1e-3, num_shared_experts=0)
# A small DeepSeek-V3-style layer (arXiv:2412.19437): sigmoid scores, 4 groups of 2
# experts with the best 2 groups eligible, aux-loss-free bias balancing, a tiny
# sequence-wise balance loss, and one always-on shared expert.
DEEPSEEK = dict(MOE, router=dict(ROUTER, score="sigmoid", n_group=4, topk_group=2,
                                 bias_update_rate=1e-3, balance_scope="sequence"),
                load_balance_weight=1e-4, num_shared_experts=1, shared_hidden_dim=128)
DENSE_TO_SPARSE = dict(MOE, dispatch="sorted", router=dict(
    name="dense_to_sparse", tau_max=2.0, tau_min=0.3, anneal_steps=400, threshold=0.001,
    switch_step=600))


def get_config(arg: str | None = None, moe: bool = True) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.aux_loss_weight = 1.0
  c.model = dict(name="lm", dtype="float32", d_model=128, num_layers=4, num_heads=4,
                 mlp_dim=512, causal=True, moe=MOE if moe else None,
                 moe_every=2 if moe else None)
  c.tasks = dict(stdlib_lm=stdlib_lm_task(batch_size=16))
  c.agd = dict(mode="agd", sampler="weighted")
  # Device mesh (product = device count; all 1 = one device). E.g. on 8 devices
  # --config.mesh.data=2 --config.mesh.expert=4 (num_experts must divide by expert).
  c.mesh = dict(data=1, fsdp=1, expert=1, model=1)
  c.data = dict(LOADER)
  c.optimizer = dict(learning_rate=3e-3, warmup_steps=100, weight_decay=1e-4, grad_clip_norm=1.0,
                     end_lr_factor=0.1)
  c.train = dict(num_steps=800, log_every=100, eval_every=400, checkpoint_every=400,
                 keep_checkpoints=2, eval_batches=20, tensorboard=True,
                 moe_telemetry=True,  # per layer, per expert loads every log step
                 **RUN_POLICIES)
  if arg == "smoke":
    c.model["num_layers"] = 2
    c.train.update(num_steps=6, log_every=3, eval_every=6, checkpoint_every=3, eval_batches=1)
    c.tasks.stdlib_lm.batch_size = 8
  elif arg == "deepseek":
    c.model.moe = DEEPSEEK
  elif arg == "dense_to_sparse":
    c.model.moe = DENSE_TO_SPARSE
  elif arg:
    raise ValueError(f"unknown lm_tiny variant {arg!r}; allowed: smoke, deepseek, dense_to_sparse")
  c = ml_collections.ConfigDict(c)
  expose_fields(c)  # every model / stack / MoE field overridable from the command line
  return c
