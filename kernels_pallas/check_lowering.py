"""Lower every kernel for CUDA (Triton) on a machine without a GPU.

  python -m kernels_pallas.check_lowering

`jax.export` with platforms=["cuda"] runs the Pallas -> Triton lowering here, so block
shapes, indexing and dtypes the Triton backend rejects fail on CPU instead of on the
first GPU run. It does not run the kernels (interpret-mode tests check the numbers) and
cannot see what the Triton compiler itself would reject later (e.g. register pressure).
Exits 1 if any kernel fails to lower.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from kernels_pallas import gmm as G
from kernels_pallas import permute, router, swiglu, tiling


def kernels(E=8, X=3000, D=256, F=384, T=1500, K=2, bm=128):
  """(name, function, example args) for each kernel at mid-sized bf16 shapes."""
  expert = jnp.asarray(np.random.default_rng(0).integers(0, E, X), jnp.int32)
  L = tiling.make_tile_layout(expert, jnp.ones(X, bool), E, bm)
  bf = lambda *shape: jnp.zeros(shape, jnp.bfloat16)
  R = L.num_rows
  gmm = lambda **kw: lambda a, b, t: G.gmm(a, b, t, block_m=bm, **G.TILES, **kw)
  return [
      ("gmm", gmm(), (bf(R, D), bf(E, D, F), L.tile_expert_I)),
      ("gmm transposed", gmm(transpose_rhs=True), (bf(R, F), bf(E, D, F), L.tile_expert_I)),
      ("tgmm", lambda a, g, s, e: G.tgmm(a, g, s, e, num_experts=E, block_m=bm,
                                         **{**G.TILES, "block_k": 128}),
       (bf(R, D), bf(R, F), L.tile_start_E, L.tile_end_E)),
      ("gmm + fused swiglu", lambda a, wg, wu, t: swiglu.gmm_swiglu(a, wg, wu, t, block_m=bm,
                                                                    **G.TILES),
       (bf(R, D), bf(E, D, F), bf(E, D, F), L.tile_expert_I)),
      ("weighted gather (permute)", permute.weighted_gather,
       (bf(T, D), jnp.zeros((R, 1), jnp.int32), jnp.ones((R, 1)))),
      ("weighted gather (combine)", permute.weighted_gather,
       (bf(R, D), jnp.zeros((T, K), jnp.int32), jnp.ones((T, K)))),
      ("top-k router", lambda l: router.fused_top_k_router(l, k=K, interpret=False),
       (jnp.zeros((T + 36, E)),)),
  ]


def main() -> int:
  failures = []
  G.FORCE_TRITON = True
  try:
    _lower_all(failures)
  finally:
    G.FORCE_TRITON = False
  print("FAILED: " + ", ".join(failures) if failures else "all kernels lower for cuda")
  return 1 if failures else 0


def _lower_all(failures: list[str]) -> None:
  for name, fn, args in kernels():
    try:
      # Triton calls carry no serialisation guarantee; we only need the lowering to run.
      export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
          export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
      print(f"ok   {name}: lowers for cuda (Triton)", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f"FAIL {name}: {type(e).__name__}: {str(e).strip()[:600]}", flush=True)
      failures.append(name)


if __name__ == "__main__":
  sys.exit(main())
