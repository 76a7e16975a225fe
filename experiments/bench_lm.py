r"""Training-step time and MFU of an MoE language model on one accelerator.

The library's own train step (moe_jax.train.step: AdamW, aux losses, the MoE layer and
dispatcher named by --dispatch) on random tokens, bf16 compute, float32 parameters.
MFU = model FLOPs per step / (step time x the chip's peak dense bf16 FLOP/s), with model
FLOPs per token = 6 x the active matmul parameters (attention projections, router, the
K experts a token visits, the output head; not the embedding lookup) + 12 x layers x
sequence x attention width (PaLM, arXiv:2204.02311 appendix B: attention scores counted
in full, not halved for the causal mask).

  python -m experiments.bench_lm --size=h200_1b              # ~1B parameters, one H200
  python -m experiments.bench_lm --size=tiny --steps=4       # a dry run on CPU
  python -m experiments.bench_lm --size=h200_1b --dispatch=pallas --json=OUT/lm.json

Needs only jax, flax, optax, absl and numpy (no ml_collections, grain or TFDS), so it runs
on a bare accelerator machine. Docs: docs/performance.md.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import cli
from moe_jax.config import MoEConfig, TransformerConfig
from moe_jax.models.lm import DecoderLM, LMConfig
from moe_jax.parallel.partitioning import mesh_from_config
from moe_jax.tasks import Task
from moe_jax.train.step import init_train_state, make_optimizer, make_train_step


@dataclasses.dataclass(frozen=True)
class Size:
  layers: int
  d_model: int
  heads: int
  experts: int  # E
  expert_hidden: int  # F
  k: int  # experts per token
  vocab: int
  batch: int
  seq: int


SIZES = {
    # ~1.0B parameters, ~0.2B active per token; MoE in every layer (OLMoE-like E/K, one
    # H200: parameters + Adam ~16 GB, activations of 32K tokens well inside 141 GB).
    "h200_1b": Size(layers=16, d_model=1024, heads=16, experts=32, expert_hidden=512, k=4,
                    vocab=32768, batch=32, seq=1024),
    "tiny": Size(layers=2, d_model=64, heads=4, experts=8, expert_hidden=32, k=2, vocab=256,
                 batch=4, seq=32),
}

# Peak dense bf16 TFLOP/s by device kind (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v5 lite": 197.0,
               "TPU v5p": 459.0, "TPU v4": 275.0}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined when it runs, so importing this module (tests, other
  experiments with their own --json) defines none."""
  flags.DEFINE_enum("size", "h200_1b", list(SIZES), "Model and batch size.")
  flags.DEFINE_integer("steps", 200, "Timed training steps.")
  flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first compiles).")
  flags.DEFINE_integer("window", 20, "Steps between device syncs (one timing each).")
  flags.DEFINE_string("dispatch", "auto", "MoE dispatcher (moe_jax.nn.dispatch).")
  flags.DEFINE_integer("batch", None, "Sequences per step (default: the size's).")
  flags.DEFINE_integer("seq", None, "Tokens per sequence (default: the size's).")
  flags.DEFINE_bool("remat", False, "Recompute each layer's activations backward.")
  flags.DEFINE_bool("scan_layers", True, "Scan the layers (compile time flat in depth).")
  flags.DEFINE_float("peak_tflops", None, "Peak dense bf16 TFLOP/s for MFU (default: by "
                     "device kind; none known: MFU is not printed).")
  flags.DEFINE_string("json", None, "Write the summary and the windows here.")


def model_for(s: Size, dispatch: str, remat: bool = False, scan_layers: bool = True) -> DecoderLM:
  moe = MoEConfig(num_experts=s.experts, expert_hidden_dim=s.expert_hidden,
                  router=dict(name="top_k", k=s.k), dispatch=dispatch,
                  load_balance_weight=1e-2, z_loss_weight=1e-3)
  decoder = TransformerConfig(num_layers=s.layers, d_model=s.d_model, num_heads=s.heads,
                              mlp_dim=4 * s.d_model, causal=True, moe=moe, moe_every=1,
                              remat=remat, scan_layers=scan_layers)
  return DecoderLM(LMConfig(decoder=decoder, vocab_size=s.vocab, lm_head_bias=False),
                   dtype=jnp.bfloat16, param_dtype=jnp.float32)


def active_params(s: Size) -> int:
  """Matmul parameters one token meets (attention q/k/v/o, router, K SwiGLU experts, head)."""
  per_layer = 4 * s.d_model * s.d_model + s.d_model * s.experts + s.k * 3 * s.d_model * s.expert_hidden
  return s.layers * per_layer + s.d_model * s.vocab


def flops_per_token(s: Size, seq: int) -> float:
  return 6.0 * active_params(s) + 12.0 * s.layers * seq * s.d_model


def peak_tflops(device_kind: str, given: float | None = None) -> float | None:
  if given:
    return given
  return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in device_kind.lower()), None)


def run() -> dict:
  s = dataclasses.replace(SIZES[FLAGS.size], batch=FLAGS.batch or SIZES[FLAGS.size].batch,
                          seq=FLAGS.seq or SIZES[FLAGS.size].seq)
  if FLAGS.steps < 1 or FLAGS.window < 1:
    raise ValueError("--steps and --window must be >= 1")
  dev = jax.devices()[0]
  model = model_for(s, FLAGS.dispatch, FLAGS.remat, FLAGS.scan_layers)
  task = Task(name="lm", kind="lm", source="random_tokens", batch_size=s.batch,
              modalities=("tokens",))
  tokens = jax.random.randint(jax.random.key(0), (4, s.batch, s.seq + 1), 1, s.vocab, jnp.int32)
  total_steps = FLAGS.warmup + FLAGS.steps
  tx = make_optimizer(dict(learning_rate=3e-4, warmup_steps=min(100, total_steps),
                           weight_decay=0.1, grad_clip_norm=1.0, end_lr_factor=0.1), total_steps)
  mesh = mesh_from_config({})
  with jax.set_mesh(mesh):
    state, _ = init_train_state(model, tx, {"lm": {"tokens": tokens[0]}}, [task], 0, mesh)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    train_step, _ = make_train_step(model, tx)
    step = jax.jit(functools.partial(train_step, task=task), donate_argnums=0)
    print(f"{FLAGS.size}: {n_params / 1e6:,.1f}M parameters, {active_params(s) / 1e6:,.1f}M "
          f"active matmul parameters per token; {s.layers} layers, d={s.d_model}, E={s.experts}, "
          f"K={s.k}, F={s.expert_hidden}, V={s.vocab}; batch {s.batch} x {s.seq} tokens; "
          f"dispatch={FLAGS.dispatch}; {dev.platform} {dev.device_kind}", flush=True)
    t0 = time.perf_counter()
    state, metrics = step(state, {"tokens": tokens[0]})
    first_loss = float(metrics["loss"])
    compile_s = time.perf_counter() - t0
    for i in range(1, FLAGS.warmup):
      state, metrics = step(state, {"tokens": tokens[i % 4]})
    jax.block_until_ready(state)
    windows, done = [], 0
    while done < FLAGS.steps:
      n = min(FLAGS.window, FLAGS.steps - done)
      t0 = time.perf_counter()
      for i in range(n):
        state, metrics = step(state, {"tokens": tokens[(done + i) % 4]})
      loss = float(metrics["loss"])  # waits for the window's last step
      windows.append((time.perf_counter() - t0) / n)
      done += n
      print(f"  step {FLAGS.warmup + done:5d}  {windows[-1] * 1e3:8.2f} ms/step  loss {loss:.3f}",
            flush=True)
  step_s = statistics.median(windows)
  tokens_per_step = s.batch * s.seq
  tflops = flops_per_token(s, s.seq) * tokens_per_step / step_s / 1e12
  peak = peak_tflops(dev.device_kind, FLAGS.peak_tflops)
  summary = dict(size=FLAGS.size, dispatch=FLAGS.dispatch, scan_layers=FLAGS.scan_layers,
                 params=n_params,
                 active_params=active_params(s), batch=s.batch, seq=s.seq,
                 device=f"{dev.platform} {dev.device_kind}", jax=jax.__version__,
                 compile_and_first_step_s=compile_s, step_ms=step_s * 1e3,
                 tokens_per_s=tokens_per_step / step_s, model_tflops=tflops, peak_tflops=peak,
                 mfu=tflops / peak if peak else None, first_loss=first_loss, last_loss=loss,
                 window_ms=[w * 1e3 for w in windows])
  mfu = f"MFU {summary['mfu']:.1%} of {peak:.0f}" if peak else "MFU: peak unknown (--peak_tflops)"
  print(f"step {step_s * 1e3:.2f} ms (median of {len(windows)} windows), "
        f"{summary['tokens_per_s']:,.0f} tokens/s, {tflops:.1f} model TFLOP/s, {mfu}; "
        f"compile + first step {compile_s:.1f} s; loss {first_loss:.3f} -> {loss:.3f}")
  if not np.isfinite(loss):
    raise ValueError(f"non-finite loss {loss} after {total_steps} steps")
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, "w") as f:
      json.dump(summary, f, indent=1)
    print(f"wrote {FLAGS.json}")
  return summary


if __name__ == "__main__":
  define_flags()
  cli.run(cli.one_line_errors(run))
