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


# Operands are cast to f32 once, before the loop: a convert fused into the dot inside
# the loop sends XLA:CPU to its slow generic dot emitter (gate|up at cpu_olmoe: 126 ms
# with in-loop casts, 59-66 ms without; measured on a loaded machine).
def _tile(a, i, m):
  return jax.lax.dynamic_slice_in_dim(a, i * m, m, 0)


def _expert(w, e):
  return jax.lax.dynamic_index_in_dim(w, e, 0, keepdims=False)


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


def _forward(lhs_RA, rhs_EAO, layout, transpose_rhs: bool):
  m = layout.block_m
  n = rhs_EAO.shape[1] if transpose_rhs else rhs_EAO.shape[2]
  dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))

  lhs, rhs = lhs_RA.astype(jnp.float32), rhs_EAO.astype(jnp.float32)

  def body(i, out):
    y = jax.lax.dot_general(_tile(lhs, i, m), _expert(rhs, layout.tile_expert_I[i]), dims)
    return jax.lax.dynamic_update_slice_in_dim(out, y, i * m, 0)

  out = _zeros((lhs_RA.shape[0], n), lhs, rhs, layout.tile_expert_I)  # unused tiles stay 0
  return jax.lax.fori_loop(0, _num_used_tiles(layout), body, out).astype(lhs_RA.dtype)


def _weight_grad(lhs_RA, grad_RO, layout, num_experts: int):
  m = layout.block_m
  lhs, grad = lhs_RA.astype(jnp.float32), grad_RO.astype(jnp.float32)

  def body(i, d_w):
    e = layout.tile_expert_I[i]
    g = jax.lax.dot_general(_tile(lhs, i, m), _tile(grad, i, m), (((0,), (0,)), ((), ())))
    return jax.lax.dynamic_update_index_in_dim(d_w, _expert(d_w, e) + g, e, 0)

  d_w = _zeros((num_experts, lhs_RA.shape[1], grad_RO.shape[1]), lhs, grad,
               layout.tile_expert_I)
  return jax.lax.fori_loop(0, _num_used_tiles(layout), body, d_w)


@jax.custom_vjp
def tile_loop_matmul(lhs_RA: jax.Array, rhs_EAO: jax.Array, layout: TileLayout) -> jax.Array:
  """out[R, O] = lhs[R, A] @ rhs[expert of row's tile], f32 per tile; zeros on unused tiles."""
  return _forward(lhs_RA, rhs_EAO, layout, transpose_rhs=False)


def _fwd(lhs_RA, rhs_EAO, layout):
  return tile_loop_matmul(lhs_RA, rhs_EAO, layout), (lhs_RA, rhs_EAO, layout)


def _bwd(res, d_out_RO):
  lhs_RA, rhs_EAO, layout = res
  d_lhs = _forward(d_out_RO, rhs_EAO, layout, transpose_rhs=True)
  d_rhs = _weight_grad(lhs_RA, d_out_RO, layout, rhs_EAO.shape[0])
  return (_like_primal(d_lhs, lhs_RA), _like_primal(d_rhs, rhs_EAO), layout.zero_cotangent())


tile_loop_matmul.defvjp(_fwd, _bwd)


# ----------------------------------------------------------------------------- fused FFN
# The whole SwiGLU expert FFN per tile in ONE loop (gate, up, SwiGLU, down): at CPU sizes
# the per-loop fixed costs (buffer init, casts, the [R, 2F] and [R, F] intermediates)
# rival the dots, so one loop forward and one backward beat six matmul loops.


def _ffn_forward(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout):
  m, E = layout.block_m, w_up_EDF.shape[0]
  x = x_RD.astype(jnp.float32)
  wg, wu, wd = (w.astype(jnp.float32) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
  R, F = x_RD.shape[0], w_up_EDF.shape[2]

  def expert(e, carry):
    wg_e, wu_e, wd_e = _expert(wg, e), _expert(wu, e), _expert(wd, e)

    def tile(i, carry):
      y, g, u = carry
      x_t = _tile(x, i, m)
      g_t, u_t = x_t @ wg_e, x_t @ wu_e
      y_t = (jax.nn.silu(g_t) * u_t) @ wd_e
      put = lambda buf, t: jax.lax.dynamic_update_slice_in_dim(buf, t, i * m, 0)
      return put(y, y_t), put(g, g_t), put(u, u_t)

    return jax.lax.fori_loop(layout.tile_start_E[e], layout.tile_end_E[e], tile, carry)

  zeros = lambda n: _zeros((R, n), x, wg, wu, wd, layout.tile_expert_I)  # unused rows: 0
  return jax.lax.fori_loop(0, E, expert, (zeros(x_RD.shape[1]), zeros(F), zeros(F)))


@jax.custom_vjp
def tile_loop_swiglu_ffn(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout: TileLayout):
  """y[R, D] = (silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e] per used tile, f32 inside."""
  return _ffn_forward(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout)[0].astype(x_RD.dtype)


def _ffn_fwd(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout):
  y, g, u = _ffn_forward(x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout)
  return y.astype(x_RD.dtype), (x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout, g, u)


def _ffn_bwd(res, d_y_RD):
  x_RD, w_gate_EDF, w_up_EDF, w_down_EFD, layout, g, u = res
  from kernels_pallas.swiglu import swiglu_grads  # pylint: disable=import-outside-toplevel
  m = layout.block_m
  x, dy = x_RD.astype(jnp.float32), d_y_RD.astype(jnp.float32)
  weights = [w.astype(jnp.float32) for w in (w_gate_EDF, w_up_EDF, w_down_EFD)]
  wg_t, wu_t, wd_t = (jnp.swapaxes(w, 1, 2) for w in weights)  # once, outside the loop
  tn = (((0,), (0,)), ((), ()))  # a^T @ b
  likes = (x, dy, g, u, *weights, layout.tile_expert_I)

  def expert(e, carry):
    dx, d_wg, d_wu, d_wd = carry
    wg_e, wu_e, wd_e = _expert(wg_t, e), _expert(wu_t, e), _expert(wd_t, e)

    def tile(i, carry):
      dx, acc_g, acc_u, acc_d = carry
      x_t, dy_t, g_t, u_t = (_tile(a, i, m) for a in (x, dy, g, u))
      acc_d = acc_d + jax.lax.dot_general(jax.nn.silu(g_t) * u_t, dy_t, tn)
      dg_t, du_t = swiglu_grads(dy_t @ wd_e, g_t, u_t)
      dx = jax.lax.dynamic_update_slice_in_dim(dx, dg_t @ wg_e + du_t @ wu_e, i * m, 0)
      return (dx, acc_g + jax.lax.dot_general(x_t, dg_t, tn),
              acc_u + jax.lax.dot_general(x_t, du_t, tn), acc_d)

    acc = tuple(_zeros(w.shape[1:], *likes) for w in weights)
    dx, acc_g, acc_u, acc_d = jax.lax.fori_loop(layout.tile_start_E[e], layout.tile_end_E[e],
                                                tile, (dx,) + acc)
    put = lambda buf, a: jax.lax.dynamic_update_index_in_dim(buf, a, e, 0)
    return dx, put(d_wg, acc_g), put(d_wu, acc_u), put(d_wd, acc_d)

  init = (_zeros(x.shape, *likes),) + tuple(_zeros(w.shape, *likes)
                                                    for w in weights)
  dx, d_wg, d_wu, d_wd = jax.lax.fori_loop(0, w_up_EDF.shape[0], expert, init)
  return (_like_primal(dx, x_RD), _like_primal(d_wg, w_gate_EDF), _like_primal(d_wu, w_up_EDF),
          _like_primal(d_wd, w_down_EFD), layout.zero_cotangent())


tile_loop_swiglu_ffn.defvjp(_ffn_fwd, _ffn_bwd)
