"""The native grouped matmuls as JAX ops over the tile-padded layout, with custom_vjps.

Axis letters: R padded rows, A contraction, O output, E experts, D model, F expert hidden.

  gmm(lhs_RA, rhs_EAO, layout)              out[R, O] = lhs @ rhs[expert of the row]
  gmm(..., transpose_rhs=True) with rhs_EOA  out[R, O] = lhs @ rhs[e]^T
  tgmm(lhs_RA, grad_RO, layout, E)           out[E, A, O] = each expert's lhs^T @ grad

Operands are float32 or bfloat16, products accumulate in float32 and the result takes the
dtype asked for (the primal's dtype in the backward pass, as autodiff would give).
`tile_matmul` is gmm with its gradient (gmm^T for d lhs, tgmm for d rhs);
`tile_swiglu_ffn` is the whole SwiGLU expert FFN with its own VJP (three gmm forward;
gmm^T, one fused two-product gmm^T for d x and three tgmm backward).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels_cpu import build
from kernels_pallas.swiglu import swiglu_grads
from kernels_pallas.tiling import TileLayout


def _ffi(target: str, out, *args, **attrs):
  why = build.unavailable()  # builds and registers the kernels on first use
  if why is not None:
    raise RuntimeError(f"kernels_cpu is unavailable: {why}")
  call = jax.ffi.ffi_call(build.TARGETS[target], out, vmap_method="sequential")
  return call(*args, **attrs)


def gmm(lhs_RA, rhs_EAO, layout: TileLayout, transpose_rhs: bool = False,
        out_dtype=None) -> jax.Array:
  """Grouped matmul per expert's rows; rows past the last expert are zero."""
  O = rhs_EAO.shape[1] if transpose_rhs else rhs_EAO.shape[2]
  out = jax.ShapeDtypeStruct((lhs_RA.shape[0], O), out_dtype or lhs_RA.dtype)
  return _ffi("MoeGmm", out, lhs_RA, rhs_EAO, layout.tile_start_E, layout.tile_end_E,
              bm=np.int64(layout.block_m), rhs_transposed=transpose_rhs)


def tgmm(lhs_RA, grad_RO, layout: TileLayout, num_experts: int, out_dtype=None) -> jax.Array:
  """Per-expert lhs^T @ grad over the expert's rows; experts without rows get zeros."""
  out = jax.ShapeDtypeStruct((num_experts, lhs_RA.shape[1], grad_RO.shape[1]),
                             out_dtype or lhs_RA.dtype)
  return _ffi("MoeTgmm", out, lhs_RA, grad_RO, layout.tile_start_E, layout.tile_end_E,
              bm=np.int64(layout.block_m))


@jax.custom_vjp
def tile_matmul(lhs_RA: jax.Array, rhs_EAO: jax.Array, layout: TileLayout) -> jax.Array:
  """out[R, O] = lhs[R, A] @ rhs[expert of the row's tile], in lhs's dtype."""
  return gmm(lhs_RA, rhs_EAO, layout)


def _fwd(lhs_RA, rhs_EAO, layout):
  return gmm(lhs_RA, rhs_EAO, layout), (lhs_RA, rhs_EAO, layout)


def _bwd(res, d_out_RO):
  lhs_RA, rhs_EAO, layout = res
  d_lhs = gmm(d_out_RO, rhs_EAO, layout, transpose_rhs=True, out_dtype=lhs_RA.dtype)
  d_rhs = tgmm(lhs_RA, d_out_RO, layout, rhs_EAO.shape[0], out_dtype=rhs_EAO.dtype)
  return d_lhs, d_rhs, layout.zero_cotangent()


tile_matmul.defvjp(_fwd, _bwd)


def _swiglu(gate, up):
  return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


@jax.custom_vjp
def tile_swiglu_ffn(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout: TileLayout) -> jax.Array:
  """(silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e] per expert's rows, in x's dtype."""
  return _ffn_fwd(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout)[0]


def _ffn_fwd(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout):
  g, u = gmm(x_RD, w_gate_EDF, layout), gmm(x_RD, w_up_EDF, layout)
  y = gmm(_swiglu(g, u), w_down_EFD, layout)
  return y, (x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout, g, u)


def _ffn_bwd(res, d_y_RD):
  """Saves x, gate and up only (h is recomputed); d x is one pass over both products.
  Autodiff of the composed FFN kept two [R, F] f32 SwiGLU intermediates and a second
  [R, D] d x buffer: 12 MB more temporaries at cpu_olmoe, past glibc's 32 MB mmap
  threshold, so every call paid fresh pages."""
  x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout, g, u = res
  d_h = gmm(d_y_RD, w_down_EFD, layout, transpose_rhs=True, out_dtype=g.dtype)
  d_g, d_u = (a.astype(g.dtype) for a in swiglu_grads(d_h, g, u))
  d_x = _ffi("MoeGmmSum", jax.ShapeDtypeStruct(x_RD.shape, x_RD.dtype), d_g, w_gate_EDF, d_u,
             w_up_EDF, layout.tile_start_E, layout.tile_end_E, bm=np.int64(layout.block_m),
             rhs_transposed=True)
  E = w_up_EDF.shape[0]
  return (d_x, tgmm(x_RD, d_g, layout, E, w_gate_EDF.dtype), tgmm(x_RD, d_u, layout, E, w_up_EDF.dtype),
          tgmm(_swiglu(g, u), d_y_RD, layout, E, w_down_EFD.dtype), layout.zero_cotangent())


tile_swiglu_ffn.defvjp(_ffn_fwd, _ffn_bwd)
