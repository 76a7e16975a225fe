"""Correctness of the compiled kernels on an accelerator (a program; pytest-free for bare hosts).

  python -m kernels_pallas.check_gpu

Checks gmm, transposed gmm, tgmm, the fused SwiGLU gmm, the permute / combine gathers
and the fused router against kernels_pallas.reference or plain XLA, in bf16 at
mid-sized shapes with empty experts and ragged group sizes. Exits 1 on a mismatch.
Imports nothing from moe_jax (kernels_pallas is a leaf); the `pallas` dispatcher vs
`sorted` check is experiments/check_gpu_dispatch.py.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import gmm as gmm_lib
from kernels_pallas.reference import (combine_reference, gmm_reference, permute_reference,
                                      tgmm_reference)
from kernels_pallas.tiling import make_tile_layout

failures = []
INTERPRET = gmm_lib.default_interpret()


def run(checks) -> int:
  """Runs each check, prints a verdict line; the exit status (1 on any failure)."""
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; tiles {gmm_lib.TILES}")
  for check in checks:
    try:
      check()
    except Exception as e:  # pylint: disable=broad-except
      print(f"FAIL {check.__name__}: {type(e).__name__}: {str(e)[:1500]}", flush=True)
      failures.append(check.__name__)
  print("FAILED: " + ", ".join(failures) if failures else "all GPU checks passed")
  return 1 if failures else 0


def close(name, got, want, rtol=2e-2, atol=2e-2):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  err = float(np.max(np.abs(got - want) / (atol + rtol * np.abs(want)))) if got.size else 0.0
  ok = err <= 1.0 and np.all(np.isfinite(got))
  print(f"{'ok  ' if ok else 'FAIL'} {name}: max scaled error {err:.3f}", flush=True)
  if not ok:
    failures.append(name)


def equal(name, got, want):
  ok = np.array_equal(np.asarray(got), np.asarray(want))
  print(f"{'ok  ' if ok else 'FAIL'} {name}: {'identical' if ok else 'differs'}", flush=True)
  if not ok:
    failures.append(name)


def check_kernels(E=8, X=3000, D=256, N=384, bm=128):
  rng = np.random.default_rng(0)
  expert = rng.integers(0, E - 2, X)  # the last two experts stay empty
  layout = make_tile_layout(jnp.asarray(expert, jnp.int32), jnp.ones(X, bool), E, bm)
  k = jax.random.split(jax.random.key(0), 3)
  lhs = jax.random.normal(k[0], (layout.num_rows, D), jnp.bfloat16)
  rhs = (jax.random.normal(k[1], (E, D, N)) * D ** -0.5).astype(jnp.bfloat16)
  grad = jax.random.normal(k[2], (layout.num_rows, N), jnp.bfloat16)
  t = layout.tile_expert_I
  close("gmm", gmm_lib.gmm(lhs, rhs, t, block_m=bm, **gmm_lib.TILES, interpret=INTERPRET),
        gmm_reference(lhs, rhs, t, bm))
  close("gmm transposed", gmm_lib.gmm(grad, rhs, t, block_m=bm, transpose_rhs=True,
                                      **gmm_lib.TILES, interpret=INTERPRET),
        gmm_reference(grad, rhs, t, bm, transpose_rhs=True))
  d_rhs = gmm_lib.tgmm(lhs, grad, layout.tile_start_E, layout.tile_end_E, num_experts=E,
                       block_m=bm, **gmm_lib.TGMM_TILES, interpret=INTERPRET)
  close("tgmm", d_rhs, tgmm_reference(lhs, grad, t, E, bm), atol=0.5)
  close("tgmm empty experts are zero", d_rhs[E - 2:], np.zeros_like(d_rhs[E - 2:]))


def check_other_kernels(T=2048, E=16, K=4, D=512, F=256, bm=128):
  from kernels_pallas import permute, router, swiglu, tiling  # pylint: disable=import-outside-toplevel
  k = jax.random.split(jax.random.key(2), 5)
  logits = jax.random.normal(k[0], (T, E)) * 2
  index, weight, position, counts = router.fused_top_k_router(logits, k=K, interpret=INTERPRET)
  r_weight, r_index = jax.lax.top_k(jax.nn.softmax(logits), K)
  equal("router index", index, r_index)
  close("router weight", weight, r_weight / r_weight.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
  layout = tiling.layout_from_ranks(index.reshape(-1), position.reshape(-1), counts, bm)
  ref_layout = tiling.make_tile_layout(index.reshape(-1), jnp.ones(T * K, bool), E, bm)
  equal("router positions -> layout", layout.slot_row_X, ref_layout.slot_row_X)
  x = jax.random.normal(k[1], (T, D), jnp.bfloat16)
  x_RD = permute.permute_tokens(x, layout, K, INTERPRET)
  equal("permute", x_RD, permute_reference(x, layout, K))
  close("unpermute+combine", permute.unpermute_combine(x_RD, layout, weight, INTERPRET),
        combine_reference(x_RD, layout, weight))
  wg = (jax.random.normal(k[2], (E, D, F)) * D ** -0.5).astype(jnp.bfloat16)
  wu = (jax.random.normal(k[3], (E, D, F)) * D ** -0.5).astype(jnp.bfloat16)
  h = swiglu.grouped_swiglu(x_RD, wg, wu, layout, INTERPRET)
  t = layout.tile_expert_I
  g = gmm_reference(x_RD, wg, t, bm).astype(jnp.float32)
  u = gmm_reference(x_RD, wu, t, bm).astype(jnp.float32)
  close("gmm + fused swiglu", h, jax.nn.silu(g) * u, atol=5e-2)


if __name__ == "__main__":
  sys.exit(run((check_kernels, check_other_kernels)))
