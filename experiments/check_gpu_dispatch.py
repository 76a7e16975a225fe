"""The `pallas` dispatcher against `sorted` on an accelerator, outputs and gradients (bf16).

  python -m experiments.check_gpu_dispatch

A program, pytest-free; run by kernels_pallas/run_gpu_checks.sh. Exits 1 on a mismatch.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from kernels_pallas.check_gpu import close, run
from moe_jax import ExpertWeights, RoutingDecision, get_dispatcher


def check_dispatcher(T=2048, D=512, F=768, E=16, K=4):
  k = jax.random.split(jax.random.key(1), 6)
  w = lambda key, shape, fan: (jax.random.normal(key, shape) * fan ** -0.5).astype(jnp.bfloat16)
  experts = ExpertWeights(w(k[0], (E, D, F), D), w(k[1], (E, F, D), F), w(k[2], (E, D, F), D))
  x = jax.random.normal(k[3], (T, D), jnp.bfloat16)
  probs = jax.nn.softmax(jax.random.normal(k[4], (T, E)) * 2, axis=-1)
  weight, index = jax.lax.top_k(probs, K)
  decision = RoutingDecision(expert_index_TK=index.astype(jnp.int32), weight_TK=weight)
  cot = jax.random.normal(k[5], (T, D), jnp.float32)

  def loss(name):
    def f(x, experts):
      y, _ = get_dispatcher(name)(x, decision, experts)
      return jnp.sum(y.astype(jnp.float32) * cot), y
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

  (_, y_p), g_p = loss("pallas")(x, experts)
  (_, y_s), g_s = loss("sorted")(x, experts)
  close("pallas dispatch output vs sorted", y_p, y_s, atol=5e-2)
  for name, a, b in zip(["d x", "d w_up", "d w_down", "d w_gate"], jax.tree.leaves(g_p),
                        jax.tree.leaves(g_s)):
    close(f"pallas dispatch {name} vs sorted", a, b, rtol=5e-2, atol=0.5)


if __name__ == "__main__":
  sys.exit(run((check_dispatcher,)))
