"""Token permutation as Pallas kernels: gather tokens into the tile-padded expert order,
and gather them back with the routing weights (unpermute + combine) in one pass.

Axis letters: T tokens, K slots per token, X = T*K slots, R padded rows, D model dim,
W source rows, O output rows, J gathered rows per output row.

Both directions are the same kernel, a weighted row gather:

  out[o] = sum_j weight[o, j] * src[index[o, j]]      (index outside [0, W) adds 0)

  permute:            O = R, J = 1: index = token of row's slot (-1 on padding), weight 1
  unpermute+combine:  O = T, J = K: index = row of each slot (R if unused), weight_TK

and each one's transpose is the other shape of the same kernel (the tile layout holds
both maps), so the backward passes are gathers too: no scatter-add, no one-hot. The
combine weights' gradient is a gather plus a row-wise dot.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.gmm import compiler_params, default_interpret, fit_block
from kernels_pallas.tiling import TileLayout


def _gather_kernel(index_ref, weight_ref, src_ref, out_ref, *, num_src: int, gathers: int):
  acc = jnp.zeros(out_ref.shape, jnp.float32)
  for j in range(gathers):  # static J: 1 (permute) or K (combine)
    idx = index_ref[:, j]
    ok = (idx >= 0) & (idx < num_src)
    rows = src_ref[jnp.clip(idx, 0, num_src - 1), :].astype(jnp.float32)
    acc = acc + jnp.where(ok[:, None], rows * weight_ref[:, j][:, None], 0.0)
  out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_rows", "block_d", "interpret"))
def weighted_gather(src_WD: jax.Array, index_OJ: jax.Array, weight_OJ: jax.Array, *,
                    block_rows: int = 32, block_d: int = 512,
                    interpret: bool = False) -> jax.Array:
  """out[o] = sum_j weight[o, j] * src[index[o, j]] (f32 sum), [O, D] in src's dtype."""
  W, D = src_WD.shape
  O, J = index_OJ.shape
  block_rows, block_d = fit_block(O, block_rows), fit_block(D, block_d)
  kernel = functools.partial(_gather_kernel, num_src=W, gathers=J)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((O, D), src_WD.dtype),
      grid=(O // block_rows, D // block_d),
      in_specs=[pl.BlockSpec((block_rows, J), lambda i, j: (i, 0)),
                pl.BlockSpec((block_rows, J), lambda i, j: (i, 0)),
                pl.BlockSpec((W, block_d), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((block_rows, block_d), lambda i, j: (i, j)),
      interpret=interpret,
      compiler_params=compiler_params(),
      name="moe_weighted_gather",
  )(index_OJ.astype(jnp.int32), weight_OJ.astype(jnp.float32), src_WD)


def weighted_gather_xla(src_WD: jax.Array, index_OJ: jax.Array, weight_OJ: jax.Array,
                        **unused) -> jax.Array:
  """The same weighted row gather in plain XLA (the `tiled` dispatcher's version)."""
  del unused
  W = src_WD.shape[0]
  ok = (index_OJ >= 0) & (index_OJ < W)
  index = jnp.clip(index_OJ, 0, W - 1)
  w = jnp.where(ok, weight_OJ.astype(jnp.float32), 0.0)
  # One [O, D] gather per j, scaled and summed: XLA fuses them into one loop. An einsum
  # over the [O, J, D] gathered rows made XLA:CPU materialise them in f32 (8 MB per call
  # at cpu_olmoe's combine, three calls per step).
  out = None
  for j in range(index_OJ.shape[1]):
    term = jnp.take(src_WD, index[:, j], axis=0).astype(jnp.float32) * w[:, j:j + 1]
    out = term if out is None else out + term
  return out.astype(src_WD.dtype)


# One function object per mode: custom_vjp's static args are compared by identity.
_PALLAS_GATHER = {mode: functools.partial(weighted_gather, interpret=mode) for mode in (False, True)}


def _row_token_R1(layout: TileLayout, slots_per_token: int) -> jax.Array:
  """Token of each padded row's slot, -1 on padding rows."""
  slot = layout.row_slot_R
  return jnp.where(slot >= 0, slot // slots_per_token, -1)[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _permute(x_TD, layout, slots_per_token, gather):
  index = _row_token_R1(layout, slots_per_token)
  return gather(x_TD, index, jnp.ones(index.shape, jnp.float32))


def _permute_fwd(x_TD, layout, slots_per_token, gather):
  return _permute(x_TD, layout, slots_per_token, gather), layout


def _permute_bwd(slots_per_token, gather, layout, d_RD):
  # Each token's gradient is the sum of its K rows: the combine gather with weight 1.
  index_TK = layout.slot_row_X.reshape(-1, slots_per_token)
  d_TD = gather(d_RD, index_TK, jnp.ones(index_TK.shape, jnp.float32))
  return d_TD, layout.zero_cotangent()


_permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _combine(y_RD, layout, weight_TK, gather):
  index_TK = layout.slot_row_X.reshape(weight_TK.shape)
  return gather(y_RD, index_TK, weight_TK)


def _combine_fwd(y_RD, layout, weight_TK, gather):
  return _combine(y_RD, layout, weight_TK, gather), (y_RD, layout, weight_TK)


def _combine_bwd(gather, res, d_TD):
  y_RD, layout, weight_TK = res
  T, K = weight_TK.shape
  # Row r gets weight[slot] * d[token of slot]: the permute gather with per-row weights.
  slot_R = layout.row_slot_R
  w_R1 = jnp.where(slot_R >= 0, weight_TK.reshape(-1)[jnp.maximum(slot_R, 0)], 0.0)[:, None]
  d_RD = gather(d_TD, _row_token_R1(layout, K), w_R1)
  # d weight[t, k] = <d[t], y[row of slot (t, k)]>: gather the K rows, row-wise dot.
  index_TK = layout.slot_row_X.reshape(T, K)
  used_TK = index_TK < y_RD.shape[0]
  y_TKD = jnp.take(y_RD, jnp.minimum(index_TK, y_RD.shape[0] - 1), axis=0)
  d_w = jnp.einsum("TD,TKD->TK", d_TD.astype(jnp.float32), y_TKD.astype(jnp.float32))
  d_w = jnp.where(used_TK, d_w, 0.0).astype(weight_TK.dtype)
  return d_RD.astype(y_RD.dtype), layout.zero_cotangent(), d_w


_combine.defvjp(_combine_fwd, _combine_bwd)


def _gather_fn(interpret: bool | None, xla: bool):
  if xla:
    return weighted_gather_xla
  return _PALLAS_GATHER[bool(default_interpret() if interpret is None else interpret)]


def permute_tokens(x_TD: jax.Array, layout: TileLayout, slots_per_token: int,
                   interpret: bool | None = None, xla: bool = False) -> jax.Array:
  """[T, D] -> [R, D]: each padded row gets its slot's token (zeros on padding rows).

  xla=True runs the gathers in plain XLA (same custom_vjp: gathers both ways)."""
  return _permute(x_TD, layout, slots_per_token, _gather_fn(interpret, xla))


def unpermute_combine(y_RD: jax.Array, layout: TileLayout, weight_TK: jax.Array,
                      interpret: bool | None = None, xla: bool = False) -> jax.Array:
  """[R, D] -> [T, D]: y[t] = sum_k weight[t, k] * y_R[row of slot (t, k)] (unused: 0)."""
  return _combine(y_RD, layout, weight_TK, _gather_fn(interpret, xla))
