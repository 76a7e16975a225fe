"""Grouped matmul over the tile-padded layout as an XLA while loop over the USED tiles:
the CPU path of the `tiled` dispatcher.

Axis letters: R padded rows, M rows per tile, A contraction, O output, E experts.

Why a loop on CPU: the static buffer holds E*(block_m-1) padding rows beyond the slots
(twice the slots at E=64, block_m=128), and a batched dot runs every tile of it. The
loop's trip count is the number of tiles actually used, so only real rows (plus at
most block_m-1 per expert) are computed; each tile is one [M, A] @ [A, O] dot against
its expert's weights, read in place (no per-tile weight copies). XLA:CPU's bf16 dots
are 1.6-5x slower than its f32 dots at these sizes, so each tile is computed in f32.
Measured at cpu_olmoe's gate|up matmul on 2 shared cores: 32 ms vs 83-160 ms for the
batched tile gather (f32, block_m 16..128), one dense f32 matmul 15 ms.

A while loop with a data-dependent trip count has no reverse-mode autodiff, so the
backward pass is a custom_vjp made of two more loops: d lhs tile = d out tile @ w[e]^T,
d w[e] += lhs tile^T @ d out tile.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.tiling import TileLayout


# Every dot runs in f32 on one tile: XLA:CPU's bf16 dots are 1.6-5x slower than its f32
# dots at these sizes. 16-bit operands stay 16-bit in memory and move through the loops as
# uint16 bits: XLA:CPU computes a bf16 dynamic-slice or dynamic-update-slice in f32 by
# converting the WHOLE buffer (and hoists that convert out of the loop), which doubles the
# bytes and the fresh pages each call touches. Moving bits keeps each convert to one tile:
# cpu_olmoe FFN forward 28 -> 16 ms, fwd+bwd 92 -> 64 ms (2026-12-01, kernels_pallas/NOTES.md).
def _bits(a: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype.itemsize == 2 else a


def _unbits(b: jax.Array, dtype) -> jax.Array:
  return jax.lax.bitcast_convert_type(b, dtype) if b.dtype == jnp.uint16 else b


def _rows(b, start, n: int, dtype) -> jax.Array:
  """f32 copy of rows [start, start + n) of a (bits) buffer."""
  return _unbits(jax.lax.dynamic_slice_in_dim(b, start, n, 0), dtype).astype(jnp.float32)


def _expert(b, e, dtype) -> jax.Array:
  """f32 copy of expert e's weight matrix from a (bits) [E, ...] buffer."""
  return _unbits(jax.lax.dynamic_index_in_dim(b, e, 0, keepdims=False), dtype).astype(jnp.float32)


def _put_rows(b, t, start, dtype) -> jax.Array:
  return jax.lax.dynamic_update_slice_in_dim(b, _bits(t.astype(dtype)), start, 0)


def _put_expert(b, t, e, dtype) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(b, _bits(t.astype(dtype)), e, 0)


def _zeros(shape, *likes) -> jax.Array:
  """f32 zeros that vary over the same mesh axes as `likes` (inside jax.shard_map a loop
  carry must keep its varying-axes type; fresh jnp.zeros would vary over none)."""
  z = jnp.zeros(shape, jnp.float32)
  for a in likes:
    z = z + jnp.zeros_like(a.reshape(-1)[:1], jnp.float32).reshape(())
  return z


def _varying(a) -> frozenset:
  mat = getattr(jax.typeof(a), "manual_axis_type", None)
  return getattr(mat, "varying", None) or frozenset()


def _like_primal(ct: jax.Array, primal: jax.Array) -> jax.Array:
  """Sum a cotangent over the mesh axes it varies over but its primal does not: inside
  jax.shard_map autodiff does this for plain JAX code; a custom_vjp has to do it itself
  (e.g. replicated expert weights get the psum of every data shard's gradient)."""
  extra = tuple(sorted(_varying(ct) - _varying(primal)))
  return (jax.lax.psum(ct, extra) if extra else ct).astype(primal.dtype)


def _num_used_tiles(layout: TileLayout) -> jax.Array:
  return jnp.sum(layout.tile_expert_I >= 0)  # used tiles come first (experts in order)


def _bits_zeros(shape, dtype, *likes) -> jax.Array:
  return _bits(_zeros(shape, *likes).astype(dtype))


def _forward(lhs_RA, rhs_EAO, layout, transpose_rhs: bool, out_dtype):
  m = layout.block_m
  n = rhs_EAO.shape[1] if transpose_rhs else rhs_EAO.shape[2]
  dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))
  lhs, rhs = _bits(lhs_RA), _bits(rhs_EAO)

  def body(i, out):
    w = _expert(rhs, layout.tile_expert_I[i], rhs_EAO.dtype)
    y = jax.lax.dot_general(_rows(lhs, i * m, m, lhs_RA.dtype), w, dims)
    return _put_rows(out, y, i * m, out_dtype)

  out = _bits_zeros((lhs_RA.shape[0], n), out_dtype, lhs_RA, rhs_EAO, layout.tile_expert_I)
  out = jax.lax.fori_loop(0, _num_used_tiles(layout), body, out)  # unused tiles stay 0
  return _unbits(out, out_dtype)


def _weight_grad(lhs_RA, grad_RO, layout, num_experts: int):
  m = layout.block_m
  lhs, grad = _bits(lhs_RA), _bits(grad_RO)
  tn = (((0,), (0,)), ((), ()))

  def body(i, d_w):
    e = layout.tile_expert_I[i]
    g = jax.lax.dot_general(_rows(lhs, i * m, m, lhs_RA.dtype),
                            _rows(grad, i * m, m, grad_RO.dtype), tn)
    return jax.lax.dynamic_update_index_in_dim(
        d_w, jax.lax.dynamic_index_in_dim(d_w, e, 0, keepdims=False) + g, e, 0)

  d_w = _zeros((num_experts, lhs_RA.shape[1], grad_RO.shape[1]), lhs_RA, grad_RO,
               layout.tile_expert_I)
  return jax.lax.fori_loop(0, _num_used_tiles(layout), body, d_w)


@jax.custom_vjp
def tile_loop_matmul(lhs_RA: jax.Array, rhs_EAO: jax.Array, layout: TileLayout) -> jax.Array:
  """out[R, O] = lhs[R, A] @ rhs[expert of row's tile], f32 per tile; zeros on unused tiles."""
  return _forward(lhs_RA, rhs_EAO, layout, transpose_rhs=False, out_dtype=lhs_RA.dtype)


def _fwd(lhs_RA, rhs_EAO, layout):
  return tile_loop_matmul(lhs_RA, rhs_EAO, layout), (lhs_RA, rhs_EAO, layout)


def _bwd(res, d_out_RO):
  lhs_RA, rhs_EAO, layout = res
  d_lhs = _forward(d_out_RO, rhs_EAO, layout, transpose_rhs=True, out_dtype=lhs_RA.dtype)
  d_rhs = _weight_grad(lhs_RA, d_out_RO, layout, rhs_EAO.shape[0])
  return (_like_primal(d_lhs, lhs_RA), _like_primal(d_rhs, rhs_EAO), layout.zero_cotangent())


tile_loop_matmul.defvjp(_fwd, _bwd)


# ----------------------------------------------------------------------------- fused FFN
# The whole SwiGLU expert FFN per tile in ONE loop (gate, up, SwiGLU, down): at CPU sizes
# the per-loop fixed costs (buffer init, casts, the [R, 2F] and [R, F] intermediates)
# rival the dots, so one loop forward and one backward beat six matmul loops. Experts are
# the outer loop so each expert's weights are read (and converted) once.


def _ffn_forward(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout):
  """(y, gate, up) in x's dtype: the output and the two pre-activations the backward needs."""
  m, dt = layout.block_m, x_RD.dtype
  ws = (w_gate_EDF, w_up_EDF, w_down_EFD)
  x, w_bits = _bits(x_RD), tuple(_bits(w) for w in ws)

  def expert(e, carry):
    wg_e, wu_e, wd_e = (_expert(b, e, w.dtype) for b, w in zip(w_bits, ws))

    def tile(i, carry):
      y, g, u = carry
      x_t = _rows(x, i * m, m, dt)
      g_t, u_t = x_t @ wg_e, x_t @ wu_e
      y_t = (jax.nn.silu(g_t) * u_t) @ wd_e
      return tuple(_put_rows(b, t, i * m, dt) for b, t in ((y, y_t), (g, g_t), (u, u_t)))

    return jax.lax.fori_loop(layout.tile_start_E[e], layout.tile_end_E[e], tile, carry)

  R, F = x_RD.shape[0], w_up_EDF.shape[2]
  zeros = lambda n: _bits_zeros((R, n), dt, x_RD, *ws, layout.tile_expert_I)  # unused rows: 0
  out = jax.lax.fori_loop(0, w_up_EDF.shape[0], expert, (zeros(x_RD.shape[1]), zeros(F), zeros(F)))
  return tuple(_unbits(b, dt) for b in out)


@jax.custom_vjp
def tile_loop_swiglu_ffn(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout: TileLayout):
  """y[R, D] = (silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e] per used tile, f32 inside."""
  return _ffn_forward(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout)[0]


def _ffn_fwd(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout):
  y, g, u = _ffn_forward(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout)
  return y, (x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout, g, u)


def _ffn_bwd(res, d_y_RD):
  x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout, g_RF, u_RF = res
  from kernels_pallas.swiglu import swiglu_grads  # pylint: disable=import-outside-toplevel
  m, dt = layout.block_m, x_RD.dtype
  ws = (w_gate_EDF, w_up_EDF, w_down_EFD)
  x, dy, g, u = (_bits(a) for a in (x_RD, d_y_RD.astype(dt), g_RF, u_RF))
  w_bits = tuple(_bits(w) for w in ws)
  tn = (((0,), (0,)), ((), ()))  # a^T @ b
  likes = (x_RD, d_y_RD, g_RF, u_RF, *ws, layout.tile_expert_I)

  def expert(e, carry):
    dx, d_wg, d_wu, d_wd = carry
    # Transposed once per expert (the barrier keeps XLA from folding the transpose back
    # into the dots): the tile dots below are then plain [M, A] @ [A, O] products, which
    # XLA:CPU runs through XNNPACK; with the transpose folded in they run ~1.7x slower.
    wg_e, wu_e, wd_e = jax.lax.optimization_barrier(
        tuple(_expert(b, e, w.dtype).T for b, w in zip(w_bits, ws)))

    def tile(i, carry):
      dx, acc_g, acc_u, acc_d = carry
      x_t, dy_t, g_t, u_t = (_rows(b, i * m, m, dt) for b in (x, dy, g, u))
      h_t_T, x_t_T = jax.lax.optimization_barrier(((jax.nn.silu(g_t) * u_t).T, x_t.T))
      acc_d = acc_d + h_t_T @ dy_t
      dg_t, du_t = swiglu_grads(dy_t @ wd_e, g_t, u_t)
      dx_t = dg_t @ wg_e + du_t @ wu_e
      return (_put_rows(dx, dx_t, i * m, dt), acc_g + x_t_T @ dg_t, acc_u + x_t_T @ du_t, acc_d)

    acc = tuple(_zeros(w.shape[1:], *likes) for w in ws)  # f32, one expert's gradients
    dx, *acc = jax.lax.fori_loop(layout.tile_start_E[e], layout.tile_end_E[e], tile, (dx, *acc))
    return (dx,) + tuple(_put_expert(b, a, e, w.dtype)
                         for b, a, w in zip((d_wg, d_wu, d_wd), acc, ws))

  init = (_bits_zeros(x_RD.shape, dt, *likes),) + tuple(
      _bits_zeros(w.shape, w.dtype, *likes) for w in ws)
  dx, *d_ws = jax.lax.fori_loop(0, w_up_EDF.shape[0], expert, init)
  return (_like_primal(_unbits(dx, dt), x_RD),
          *(_like_primal(_unbits(b, w.dtype), w) for b, w in zip(d_ws, ws)),
          layout.zero_cotangent())


tile_loop_swiglu_ffn.defvjp(_ffn_fwd, _ffn_bwd)
