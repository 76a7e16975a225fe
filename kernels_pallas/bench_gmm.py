r"""Grouped-matmul kernel benchmark (a program): our gmm / tgmm vs a dense matmul of equal FLOPs.

  python -m kernels_pallas.bench_gmm [--shapes=gpu|cpu] [--sweep]

For each shape, rows are routed uniformly at random (T*K slots over E experts),
laid out tile-padded, and the forward gate|up product [R, D] @ [E, D, 2F] is timed
for each tile configuration (block_n, block_k, num_warps, num_stages), plus the
backward products (transposed gmm, tgmm) at the default tiles; `dense` is
[T*K, D] @ [D, 2F] with the same useful FLOPs. Median of 10 runs after warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import gmm as gmm_lib
from kernels_pallas.tiling import make_tile_layout

SHAPES = {"gpu": [("mixtral", 16384, 4096, 14336, 8, 2), ("olmoe", 16384, 2048, 1024, 64, 8),
                  ("qwen3", 16384, 2048, 768, 128, 8)],
          "cpu": [("cpu_olmoe", 512, 128, 64, 16, 4)]}
SWEEP = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (256, 64, 8, 3), (128, 128, 8, 3),
         (64, 64, 4, 4)]


def timed(fn, *args, iters=10) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--shapes", default="gpu", choices=sorted(SHAPES))
  parser.add_argument("--sweep", action="store_true", help="try every SWEEP tile config")
  parser.add_argument("--block_m", type=int, default=128)
  args = parser.parse_args()
  interpret = gmm_lib.default_interpret()
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, interpret={interpret}, "
        f"default tiles {gmm_lib.TILES}")
  for name, T, D, F, E, K in SHAPES[args.shapes]:
    rng = np.random.default_rng(0)
    layout = make_tile_layout(jnp.asarray(rng.integers(0, E, T * K), jnp.int32),
                              jnp.ones(T * K, bool), E, args.block_m)
    keys = jax.random.split(jax.random.key(0), 4)
    lhs = jax.random.normal(keys[0], (layout.num_rows, D), jnp.bfloat16)
    rhs = (jax.random.normal(keys[1], (E, D, 2 * F), jnp.float32) * D ** -0.5).astype(jnp.bfloat16)
    grad = jax.random.normal(keys[2], (layout.num_rows, 2 * F), jnp.bfloat16)
    flops = 2.0 * T * K * D * 2 * F
    x_dense = jax.random.normal(keys[3], (T * K, D), jnp.bfloat16)
    dense = timed(jax.jit(lambda a, b: a @ b), x_dense, rhs[0])
    print(f"{name}: T={T} D={D} F={F} E={E} K={K} rows={layout.num_rows}; dense "
          f"{dense * 1e3:.2f} ms = {flops / dense / 1e12:.0f} TFLOP/s")
    configs = SWEEP if args.sweep else [tuple(gmm_lib.TILES.values())]
    for bn, bk, warps, stages in configs:
      kw = dict(block_m=args.block_m, block_n=bn, block_k=bk, interpret=interpret,
                num_warps=warps, num_stages=stages)
      try:
        t = timed(lambda a, b: gmm_lib.gmm(a, b, layout.tile_expert_I, **kw), lhs, rhs)
        print(f"  gmm  bn={bn} bk={bk} warps={warps} stages={stages}: {t * 1e3:.2f} ms = "
              f"{flops / t / 1e12:.0f} TFLOP/s ({dense / t:.0%} of dense)", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        print(f"  gmm  bn={bn} bk={bk} warps={warps} stages={stages}: error "
              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    kw = dict(block_m=args.block_m, interpret=interpret, **gmm_lib.TILES)
    for label, fn, a in [
        ("gmm^T", lambda g, b: gmm_lib.gmm(g, b, layout.tile_expert_I, transpose_rhs=True, **kw),
         (grad, rhs)),
        ("tgmm", lambda l, g: gmm_lib.tgmm(l, g, layout.tile_start_E, layout.tile_end_E,
                                           num_experts=E, **{**kw, "block_k": 128}), (lhs, grad))]:
      try:
        t = timed(fn, *a)
        print(f"  {label} default tiles: {t * 1e3:.2f} ms = {flops / t / 1e12:.0f} TFLOP/s "
              f"({dense / t:.0%} of dense)", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        print(f"  {label}: error {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)


if __name__ == "__main__":
  main()
