"""Grouped matmul over a tile-padded expert layout, as Pallas kernels.

Axis letters: R padded rows (expert-sorted, see tiling.py), A contraction,
O output features, E experts, I row tiles.

  gmm:   out[R, O] = lhs[R, A] @ rhs[e(tile), A, O]   (or rhs[e]^T with transpose_rhs)
  tgmm:  out[E, A, O] = sum over e's tiles of lhs[tile]^T @ grad[tile]

Every row tile belongs to one expert, so a program computes one dense
[block_m, block_n] tile with f32 accumulation over A; tiles past the last expert
are skipped (written as zeros). `grouped_matmul` wraps both in a custom_vjp:
d lhs = gmm(d out, rhs, transposed), d rhs = tgmm(lhs, d out).
On CPU the same kernels run with interpret=True (the default there).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.tiling import TileLayout


def _tiles_from_env() -> dict:
  """Tile sizes and Triton launch parameters; MOE_JAX_GMM_TILES="bn,bk,warps,stages" overrides."""
  bn, bk, warps, stages = (int(v) for v in os.environ.get("MOE_JAX_GMM_TILES", "128,64,4,3")
                           .split(","))
  return dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)


TILES = _tiles_from_env()
# tgmm: A block 128 (unmeasured on GPU; bench_gmm --sweep is where to set it from).
TGMM_TILES = {**TILES, "block_k": 128}


def default_interpret() -> bool:
  return jax.default_backend() == "cpu"


def fit_block(dim: int, preferred: int) -> int:
  """Largest power of two <= preferred that divides dim (dims must tile exactly)."""
  b = preferred
  while b > 1 and dim % b:
    b //= 2
  return b


# Lower for Triton even off-GPU: check_lowering.py sets this to export the kernels for
# CUDA on a CPU-only machine.
FORCE_TRITON = False


def compiler_params(backend_kwargs: dict | None = None):
  """Triton parameters on GPU (always given: without them jax picks its Mosaic GPU
  backend, which these kernels are not written for); nothing elsewhere."""
  if jax.default_backend() != "gpu" and not FORCE_TRITON:
    return None
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
  return plgpu.CompilerParams(**(backend_kwargs or {}))


def dot_f32(a, b, trans_a: bool = False, trans_b: bool = False):
  """a @ b with optional transposes folded into the contraction; f32 accumulation."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _gmm_kernel(tile_expert_ref, lhs_ref, rhs_ref, out_ref, *, block_k: int, num_k: int,
                block_n: int, transpose_rhs: bool):
  i, j = pl.program_id(0), pl.program_id(1)
  e = tile_expert_ref[i]

  @pl.when(e < 0)
  def _():
    out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

  @pl.when(e >= 0)
  def _():
    def body(kk, acc):
      a = lhs_ref[:, pl.ds(kk * block_k, block_k)]
      if transpose_rhs:
        b = rhs_ref[e, pl.ds(j * block_n, block_n), pl.ds(kk * block_k, block_k)]
        return acc + dot_f32(a, b, trans_b=True)
      b = rhs_ref[e, pl.ds(kk * block_k, block_k), pl.ds(j * block_n, block_n)]
      return acc + dot_f32(a, b)

    acc = jax.lax.fori_loop(0, num_k, body, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "transpose_rhs",
                                             "interpret", "num_warps", "num_stages"))
def gmm(lhs_RA, rhs, tile_expert_I, *, block_m: int, block_n: int = 128, block_k: int = 64,
        transpose_rhs: bool = False, interpret: bool = False, num_warps: int | None = None,
        num_stages: int | None = None):
  """out[R, O] = lhs[R, A] @ rhs[e] per row tile; rhs is [E, A, O] ([E, O, A] if transposed)."""
  R, A = lhs_RA.shape
  O = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  block_n, block_k = fit_block(O, block_n), fit_block(A, block_k)
  kernel = functools.partial(_gmm_kernel, block_k=block_k, num_k=A // block_k, block_n=block_n,
                             transpose_rhs=transpose_rhs)
  params = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v}
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((R, O), lhs_RA.dtype),
      grid=(R // block_m, O // block_n),
      in_specs=[pl.BlockSpec(tile_expert_I.shape, lambda i, j: (0,)),
                pl.BlockSpec((block_m, A), lambda i, j: (i, 0)),
                pl.BlockSpec(rhs.shape, lambda i, j: (0, 0, 0))],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      interpret=interpret,
      compiler_params=compiler_params(params),
      name="moe_gmm_t" if transpose_rhs else "moe_gmm",
  )(tile_expert_I, lhs_RA, rhs)


def _tgmm_kernel(tile_start_ref, tile_end_ref, lhs_ref, grad_ref, out_ref, *, block_m: int,
                 block_k: int, block_n: int):
  e, kb, nb = pl.program_id(0), pl.program_id(1), pl.program_id(2)

  def body(t, acc):
    a = lhs_ref[pl.ds(t * block_m, block_m), pl.ds(kb * block_k, block_k)]
    g = grad_ref[pl.ds(t * block_m, block_m), pl.ds(nb * block_n, block_n)]
    return acc + dot_f32(a, g, trans_a=True)

  acc = jax.lax.fori_loop(tile_start_ref[e], tile_end_ref[e], body,
                          jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_experts", "block_m", "block_n", "block_k",
                                             "interpret", "num_warps", "num_stages"))
def tgmm(lhs_RA, grad_RO, tile_start_E, tile_end_E, *, num_experts: int, block_m: int,
         block_n: int = 128, block_k: int = 128, interpret: bool = False,
         num_warps: int | None = None, num_stages: int | None = None):
  """out[e] = lhs[rows of e]^T @ grad[rows of e], [E, A, O]; zeros for empty experts."""
  R, A = lhs_RA.shape
  O = grad_RO.shape[1]
  block_n, block_k = fit_block(O, block_n), fit_block(A, block_k)
  kernel = functools.partial(_tgmm_kernel, block_m=block_m, block_k=block_k, block_n=block_n)
  params = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v}
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_experts, A, O), lhs_RA.dtype),
      grid=(num_experts, A // block_k, O // block_n),
      in_specs=[pl.BlockSpec(tile_start_E.shape, lambda e, k, n: (0,)),
                pl.BlockSpec(tile_end_E.shape, lambda e, k, n: (0,)),
                pl.BlockSpec((R, A), lambda e, k, n: (0, 0)),
                pl.BlockSpec((R, O), lambda e, k, n: (0, 0))],
      out_specs=pl.BlockSpec((None, block_k, block_n), lambda e, k, n: (e, k, n)),
      interpret=interpret,
      compiler_params=compiler_params(params),
      name="moe_tgmm",
  )(tile_start_E, tile_end_E, lhs_RA, grad_RO)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul(lhs_RA, rhs_EAO, layout: TileLayout, interpret: bool):
  return gmm(lhs_RA, rhs_EAO, layout.tile_expert_I, block_m=layout.block_m, interpret=interpret,
             **TILES)


def _fwd(lhs_RA, rhs_EAO, layout, interpret):
  return _grouped_matmul(lhs_RA, rhs_EAO, layout, interpret), (lhs_RA, rhs_EAO, layout)


def _bwd(interpret, res, d_out_RO):
  lhs_RA, rhs_EAO, layout = res
  d_lhs = gmm(d_out_RO, rhs_EAO, layout.tile_expert_I, block_m=layout.block_m,
              transpose_rhs=True, interpret=interpret, **TILES)
  d_rhs = tgmm(lhs_RA, d_out_RO, layout.tile_start_E, layout.tile_end_E,
               num_experts=rhs_EAO.shape[0], block_m=layout.block_m, interpret=interpret,
               **TGMM_TILES)
  return d_lhs, d_rhs.astype(rhs_EAO.dtype), layout.zero_cotangent()


_grouped_matmul.defvjp(_fwd, _bwd)


def grouped_matmul(lhs_RA: jax.Array, rhs_EAO: jax.Array, layout: TileLayout,
                   interpret: bool | None = None) -> jax.Array:
  """Differentiable out[R, O] = lhs[R, A] @ rhs[expert of row's tile]."""
  if interpret is None:
    interpret = default_interpret()
  return _grouped_matmul(lhs_RA, rhs_EAO, layout, interpret)
