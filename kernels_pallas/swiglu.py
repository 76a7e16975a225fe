"""Grouped matmul with a fused SwiGLU epilogue: h = silu(lhs @ w_gate[e]) * (lhs @ w_up[e]).

Axis letters: R padded rows (tile layout), D model dim (contraction), F expert hidden.

One program computes the gate and up tiles of one [block_m, block_n] output block
from the same lhs tile (lhs read once for both), applies SwiGLU in registers and
writes h, plus the two pre-activations the backward pass needs. Without the fusion
the layer writes [R, 2F] pre-activations, reads them back and writes h, and it
concatenates [w_gate | w_up] every step; here the weights stay as they are.

Backward (custom_vjp): d gate and d up are elementwise (XLA fuses them), then
d lhs = gmm(d gate, w_gate^T) + gmm(d up, w_up^T) and d w = tgmm(lhs, d gate / d up).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import gmm as G
from kernels_pallas.tiling import TileLayout


def _swiglu_kernel(tile_expert_ref, lhs_ref, gate_w_ref, up_w_ref, h_ref, gate_ref, up_ref, *,
                   block_k: int, num_k: int, block_n: int):
  i, j = pl.program_id(0), pl.program_id(1)
  e = tile_expert_ref[i]

  @pl.when(e < 0)
  def _():
    for ref in (h_ref, gate_ref, up_ref):
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  @pl.when(e >= 0)
  def _():
    def body(kk, carry):
      acc_g, acc_u = carry
      a = lhs_ref[:, pl.ds(kk * block_k, block_k)]
      cols = (e, pl.ds(kk * block_k, block_k), pl.ds(j * block_n, block_n))
      return acc_g + G.dot_f32(a, gate_w_ref[cols]), acc_u + G.dot_f32(a, up_w_ref[cols])

    zeros = jnp.zeros(h_ref.shape, jnp.float32)
    g, u = jax.lax.fori_loop(0, num_k, body, (zeros, zeros))
    h_ref[...] = (jax.nn.silu(g) * u).astype(h_ref.dtype)
    gate_ref[...] = g.astype(gate_ref.dtype)
    up_ref[...] = u.astype(up_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "interpret",
                                             "num_warps", "num_stages"))
def gmm_swiglu(lhs_RD, w_gate_EDF, w_up_EDF, tile_expert_I, *, block_m: int, block_n: int = 128,
               block_k: int = 64, interpret: bool = False, num_warps: int | None = None,
               num_stages: int | None = None):
  """(h, gate, up), each [R, F]: gate = lhs @ w_gate[e], up = lhs @ w_up[e], h = silu(gate) * up."""
  R, D = lhs_RD.shape
  F = w_up_EDF.shape[2]
  block_n, block_k = G.fit_block(F, block_n), G.fit_block(D, block_k)
  kernel = functools.partial(_swiglu_kernel, block_k=block_k, num_k=D // block_k,
                             block_n=block_n)
  params = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v}
  out = jax.ShapeDtypeStruct((R, F), lhs_RD.dtype)
  tile = pl.BlockSpec((block_m, block_n), lambda i, j: (i, j))
  return pl.pallas_call(
      kernel,
      out_shape=(out, out, out),
      grid=(R // block_m, F // block_n),
      in_specs=[pl.BlockSpec(tile_expert_I.shape, lambda i, j: (0,)),
                pl.BlockSpec((block_m, D), lambda i, j: (i, 0)),
                pl.BlockSpec(w_gate_EDF.shape, lambda i, j: (0, 0, 0)),
                pl.BlockSpec(w_up_EDF.shape, lambda i, j: (0, 0, 0))],
      out_specs=(tile, tile, tile),
      interpret=interpret,
      compiler_params=G.compiler_params(params),
      name="moe_gmm_swiglu",
  )(tile_expert_I, lhs_RD, w_gate_EDF, w_up_EDF)


def swiglu_grads(d_h, gate, up):
  """(d gate, d up) of h = silu(gate) * up, in f32."""
  g, u, dh = (a.astype(jnp.float32) for a in (gate, up, d_h))
  sig = jax.nn.sigmoid(g)
  silu = g * sig
  return dh * u * sig * (1.0 + g * (1.0 - sig)), dh * silu


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped_swiglu(lhs_RD, w_gate_EDF, w_up_EDF, layout: TileLayout, interpret: bool):
  h, _, _ = gmm_swiglu(lhs_RD, w_gate_EDF, w_up_EDF, layout.tile_expert_I,
                       block_m=layout.block_m, interpret=interpret, **G.TILES)
  return h


def _fwd(lhs_RD, w_gate_EDF, w_up_EDF, layout, interpret):
  h, gate, up = gmm_swiglu(lhs_RD, w_gate_EDF, w_up_EDF, layout.tile_expert_I,
                           block_m=layout.block_m, interpret=interpret, **G.TILES)
  return h, (lhs_RD, w_gate_EDF, w_up_EDF, layout, gate, up)


def _bwd(interpret, res, d_h):
  lhs_RD, w_gate_EDF, w_up_EDF, layout, gate, up = res
  d_gate, d_up = (d.astype(lhs_RD.dtype) for d in swiglu_grads(d_h, gate, up))
  common = dict(block_m=layout.block_m, interpret=interpret)
  d_lhs = (G.gmm(d_gate, w_gate_EDF, layout.tile_expert_I, transpose_rhs=True, **common,
                 **G.TILES).astype(jnp.float32)
           + G.gmm(d_up, w_up_EDF, layout.tile_expert_I, transpose_rhs=True, **common,
                   **G.TILES).astype(jnp.float32))
  tg = dict(num_experts=w_gate_EDF.shape[0], **common, **G.TGMM_TILES)
  d_wg = G.tgmm(lhs_RD, d_gate, layout.tile_start_E, layout.tile_end_E, **tg)
  d_wu = G.tgmm(lhs_RD, d_up, layout.tile_start_E, layout.tile_end_E, **tg)
  return (d_lhs.astype(lhs_RD.dtype), d_wg.astype(w_gate_EDF.dtype), d_wu.astype(w_up_EDF.dtype),
          layout.zero_cotangent())


_grouped_swiglu.defvjp(_fwd, _bwd)


def grouped_swiglu(lhs_RD: jax.Array, w_gate_EDF: jax.Array, w_up_EDF: jax.Array,
                   layout: TileLayout, interpret: bool | None = None) -> jax.Array:
  """Differentiable h[R, F] = silu(lhs @ w_gate[e]) * (lhs @ w_up[e]) per row tile."""
  if interpret is None:
    interpret = G.default_interpret()
  return _grouped_swiglu(lhs_RD, w_gate_EDF, w_up_EDF, layout, interpret)
