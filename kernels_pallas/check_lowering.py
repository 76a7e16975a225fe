"""Lower every kernel for CUDA (Pallas -> Triton) and TPU (Pallas -> Mosaic) on a machine
with neither.

  python -m kernels_pallas.check_lowering

`jax.export(platforms=[...])` runs the Pallas lowering here, so block shapes, indexing
and ops a backend rejects fail on CPU instead of on the first accelerator run. For TPU
the lowering asks jax which chip it targets; we answer "TPU v5 lite" by patching
`tpu_info.get_device_kind` for the duration, and from jax 0.11 the Triton lowering asks too
(answered "H200" through `gpu_info.get_gpu_info`); both are jax internals: if they move,
the half affected reports FAIL with the reason. Neither half compiles to machine code: what the Triton
or Mosaic compilers reject later (registers, VMEM layout passes), and every number,
still needs the accelerator. Interpret-mode tests check the numbers. Exits 1 on a failure.
"""
from __future__ import annotations

import contextlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from kernels_pallas import gmm as G
from kernels_pallas import gmm_tpu, permute, router, swiglu, tiling

TRITON_CALL = "__gpu$xla.gpu.triton"


def _layout(E, X, bm):
  expert = jnp.asarray(np.random.default_rng(0).integers(0, E, X), jnp.int32)
  return tiling.make_tile_layout(expert, jnp.ones(X, bool), E, bm)


def cuda_kernels(E=8, X=3000, D=256, F=384, T=1500, K=2, bm=128):
  """(name, function, example args) for each GPU kernel at mid-sized bf16 shapes."""
  L = _layout(E, X, bm)
  bf = lambda *shape: jnp.zeros(shape, jnp.bfloat16)
  R = L.num_rows
  gmm = lambda **kw: lambda a, b, t: G.gmm(a, b, t, block_m=bm, **G.TILES, **kw)
  return [
      ("gmm", gmm(), (bf(R, D), bf(E, D, F), L.tile_expert_I)),
      ("gmm transposed", gmm(transpose_rhs=True), (bf(R, F), bf(E, D, F), L.tile_expert_I)),
      ("tgmm", lambda a, g, s, e: G.tgmm(a, g, s, e, num_experts=E, block_m=bm,
                                         **G.TGMM_TILES),
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


def tpu_kernels(E=8, X=3000, D=1024, F=768, T=1536, K=2, bm=128):
  """The Mosaic kernels: grouped matmuls of gmm_tpu.py and the router."""
  L = _layout(E, X, bm)
  bf = lambda *shape: jnp.zeros(shape, jnp.bfloat16)
  R = L.num_rows
  return [
      ("gmm (tpu)", lambda a, b: gmm_tpu.gmm_tpu(a, b, L), (bf(R, D), bf(E, D, F))),
      ("gmm transposed (tpu)", lambda a, b: gmm_tpu.gmm_tpu(a, b, L, transpose_rhs=True),
       (bf(R, F), bf(E, D, F))),
      ("tgmm (tpu)", lambda a, g: gmm_tpu.tgmm_tpu(a, g, L, num_experts=E),
       (bf(R, D), bf(R, F))),
      ("top-k router (tpu)", lambda l: router.fused_top_k_router(l, k=K, interpret=False),
       (jnp.zeros((T, E)),)),
  ]


@contextlib.contextmanager
def _force_triton(gpu: str = "H200"):
  """Triton lowering; from jax 0.11 it also asks which GPU it targets (compute capability),
  answered with an H200 for the duration (a jax internal, like the TPU half's)."""
  G.FORCE_TRITON = True
  try:
    from jax._src.pallas.triton import gpu_info  # pylint: disable=import-outside-toplevel
  except ImportError:  # jax 0.10: the lowering does not ask
    gpu_info = None
  saved = getattr(gpu_info, "get_gpu_info", None)
  if saved is not None:
    gpu_info.get_gpu_info = lambda: gpu_info.get_gpu_info_from_version(
        getattr(gpu_info.GpuVersion, gpu))
  try:
    yield
  finally:
    G.FORCE_TRITON = False
    if saved is not None:
      gpu_info.get_gpu_info = saved


@contextlib.contextmanager
def _pretend_tpu(device_kind: str = "TPU v5 lite"):
  from jax._src.pallas.mosaic import tpu_info  # pylint: disable=import-outside-toplevel
  saved = tpu_info.get_device_kind, tpu_info.get_num_device_cores
  tpu_info.get_device_kind, tpu_info.get_num_device_cores = lambda: device_kind, lambda: 1
  try:
    yield
  finally:
    tpu_info.get_device_kind, tpu_info.get_num_device_cores = saved


def _lower(platform: str, kernels, context, failures: list[str]) -> None:
  checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)] if platform == "cuda" else []
  jax.clear_caches()  # jitted kernels traced for the other platform must not be reused
  with context():
    for name, fn, args in kernels:
      try:
        export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
        print(f"ok   {name}: lowers for {platform}", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        print(f"FAIL {name}: {type(e).__name__}: {str(e).strip()[:600]}", flush=True)
        failures.append(name)


def main() -> int:
  failures: list[str] = []
  _lower("cuda", cuda_kernels(), _force_triton, failures)
  _lower("tpu", tpu_kernels(), _pretend_tpu, failures)
  jax.clear_caches()
  print("FAILED: " + ", ".join(failures) if failures else "all kernels lower for cuda and tpu")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
