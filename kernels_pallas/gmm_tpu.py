"""Grouped matmul for TPU (Pallas Mosaic): the tile->expert map is scalar-prefetched, so
each program's BlockSpec pulls exactly its expert's weight block into VMEM.

Axis letters: R padded rows (tile layout), A contraction, O output, E experts, I row tiles.

The GPU kernels (gmm.py) index one whole-array weight ref inside the kernel, which
Triton allows; Mosaic wants every operand as a VMEM block whose index comes from the
grid, hence this separate formulation:

  gmm:  grid (I, O/bn, A/bk), A innermost; rhs block (e(i), k, j) via the prefetched
        map; f32 VMEM accumulator, written on the last k. Unused tiles write zeros.
  tgmm: grid (A/bk, O/bn, I), tiles innermost; the output block (e(i), k, n) stays
        resident while consecutive tiles share an expert and is zeroed on its expert's
        first tile. The output aliases a zeros input, so experts with no tile (never
        visited) keep zeros; trailing unused tiles point at the last used expert's
        block and add nothing.
Block dims follow Mosaic's rule: the last two are multiples of (8, 128) or the full dim.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.gmm import dot_f32, fit_block
from kernels_pallas.tiling import TileLayout


def _gmm_kernel(expert_ref, used_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, num_k: int,
                transpose_rhs: bool):
  del expert_ref
  i, k = pl.program_id(0), pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(used_ref[i] > 0)
  def _():
    acc_ref[...] += dot_f32(lhs_ref[...], rhs_ref[...], trans_b=transpose_rhs)

  @pl.when(k == num_k - 1)
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _maps(layout: TileLayout):
  """(expert of each tile with unused tiles pointing at the last used expert, used 0/1)."""
  used = (layout.tile_expert_I >= 0).astype(jnp.int32)
  last = jnp.max(layout.tile_expert_I)
  expert = jnp.where(used > 0, layout.tile_expert_I, jnp.maximum(last, 0)).astype(jnp.int32)
  return expert, used


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "transpose_rhs", "interpret"))
def gmm_tpu(lhs_RA, rhs, layout: TileLayout, *, block_n: int = 512, block_k: int = 512,
            transpose_rhs: bool = False, interpret: bool = False):
  """out[R, O] = lhs[R, A] @ rhs[e(tile)] ([E, A, O], or [E, O, A] with transpose_rhs)."""
  R, A = lhs_RA.shape
  O = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  bm = layout.block_m
  bn, bk = fit_block(O, block_n), fit_block(A, block_k)
  expert, used = _maps(layout)
  if transpose_rhs:
    rhs_spec = pl.BlockSpec((None, bn, bk), lambda i, j, k, e, u: (e[i], j, k))
  else:
    rhs_spec = pl.BlockSpec((None, bk, bn), lambda i, j, k, e, u: (e[i], k, j))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(R // bm, O // bn, A // bk),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j, k, e, u: (i, k)), rhs_spec],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, k, e, u: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)])
  return pl.pallas_call(
      functools.partial(_gmm_kernel, num_k=A // bk, transpose_rhs=transpose_rhs),
      out_shape=jax.ShapeDtypeStruct((R, O), lhs_RA.dtype),
      grid_spec=grid_spec,
      compiler_params=None if interpret else pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="moe_gmm_tpu_t" if transpose_rhs else "moe_gmm_tpu",
  )(expert, used, lhs_RA, rhs)


def _tgmm_kernel(expert_ref, used_ref, first_ref, lhs_ref, grad_ref, zeros_ref, out_ref):
  del expert_ref, zeros_ref
  i = pl.program_id(2)

  @pl.when(first_ref[i] > 0)
  def _():
    out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

  @pl.when(used_ref[i] > 0)
  def _():
    out_ref[...] += dot_f32(lhs_ref[...], grad_ref[...], trans_a=True)


@functools.partial(jax.jit, static_argnames=("num_experts", "block_n", "block_k", "interpret"))
def tgmm_tpu(lhs_RA, grad_RO, layout: TileLayout, *, num_experts: int, block_n: int = 512,
             block_k: int = 512, interpret: bool = False):
  """out[e] = lhs[rows of e]^T @ grad[rows of e], [E, A, O] in f32; zeros for empty experts."""
  R, A = lhs_RA.shape
  O = grad_RO.shape[1]
  bm = layout.block_m
  bn, bk = fit_block(O, block_n), fit_block(A, block_k)
  expert, used = _maps(layout)
  tiles = jnp.arange(R // bm, dtype=jnp.int32)
  first = (used > 0) & (tiles == layout.tile_start_E[jnp.maximum(layout.tile_expert_I, 0)])
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(A // bk, O // bn, R // bm),
      in_specs=[pl.BlockSpec((bm, bk), lambda k, n, i, e, u, f: (i, k)),
                pl.BlockSpec((bm, bn), lambda k, n, i, e, u, f: (i, n)),
                pl.BlockSpec(memory_space=pl.ANY)],  # the aliased zeros: never read
      out_specs=pl.BlockSpec((None, bk, bn), lambda k, n, i, e, u, f: (e[i], k, n)))
  zeros = jnp.zeros((num_experts, A, O), jnp.float32)
  return pl.pallas_call(
      _tgmm_kernel,
      out_shape=jax.ShapeDtypeStruct((num_experts, A, O), jnp.float32),
      grid_spec=grid_spec,
      input_output_aliases={5: 0},  # operands: expert, used, first, lhs, grad, zeros
      compiler_params=None if interpret else pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="moe_tgmm_tpu",
  )(expert, used, first.astype(jnp.int32), lhs_RA, grad_RO, zeros)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul_tpu(lhs_RA, rhs_EAO, layout: TileLayout, interpret: bool):
  return gmm_tpu(lhs_RA, rhs_EAO, layout, interpret=interpret)


def _fwd(lhs_RA, rhs_EAO, layout, interpret):
  return _grouped_matmul_tpu(lhs_RA, rhs_EAO, layout, interpret), (lhs_RA, rhs_EAO, layout)


def _bwd(interpret, res, d_out_RO):
  lhs_RA, rhs_EAO, layout = res
  d_lhs = gmm_tpu(d_out_RO, rhs_EAO, layout, transpose_rhs=True, interpret=interpret)
  d_rhs = tgmm_tpu(lhs_RA, d_out_RO, layout, num_experts=rhs_EAO.shape[0], interpret=interpret)
  return d_lhs, d_rhs.astype(rhs_EAO.dtype), layout.zero_cotangent()


_grouped_matmul_tpu.defvjp(_fwd, _bwd)


def grouped_matmul_tpu(lhs_RA: jax.Array, rhs_EAO: jax.Array, layout: TileLayout,
                       interpret: bool | None = None) -> jax.Array:
  """Differentiable out[R, O] = lhs[R, A] @ rhs[expert of row's tile] (Mosaic TPU)."""
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  return _grouped_matmul_tpu(lhs_RA, rhs_EAO, layout, interpret)
