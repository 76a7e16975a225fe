"""Ragged all-to-all for dropless expert parallelism, with a fallback where XLA lacks it.

Axis letters: N devices on the exchange axis, M rows one device may send to one peer
(a static bound), D row width.

`ragged_exchange` has the semantics of `jax.lax.ragged_all_to_all`: device i sends
rows operand[input_offsets[j] : + send_sizes[j]] to device j, which writes them at
its output[output_offsets[j] : + send_sizes[j]] (offsets on the receiver, known to the
sender); recv_sizes[j] is what i gets from j. Rows of `output` nobody writes keep
their value.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Platforms whose XLA backend implements the ragged-all-to-all HLO (XLA:CPU does not:
# "HLO opcode `ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter").
RAGGED_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")


def ragged_supported() -> bool:
  return jax.default_backend() in RAGGED_PLATFORMS


def ragged_exchange(operand_XD: jax.Array, output_YD: jax.Array, input_offsets_N: jax.Array,
                    send_sizes_N: jax.Array, output_offsets_N: jax.Array,
                    recv_sizes_N: jax.Array, *, axis_name: str, max_rows: int,
                    ragged: bool | None = None) -> jax.Array:
  """`ragged_all_to_all` where supported (`ragged=None`: by backend), else a padded emulation.

  `max_rows` (M) bounds every send_sizes[j]; only the emulation uses it. The
  emulation sends a fixed [N, M, D] buffer with one `all_to_all` (plus the output
  offsets, N ints): each device moves N * M rows whatever it really sends, against
  sum(send_sizes) rows for the ragged collective. With M the worst case of one peer,
  that is N x (or more) the bytes: correct everywhere, fast nowhere; use it on CPU.
  """
  if ragged is None:
    ragged = ragged_supported()
  if ragged:
    return jax.lax.ragged_all_to_all(operand_XD, output_YD, input_offsets_N, send_sizes_N,
                                     output_offsets_N, recv_sizes_N, axis_name=axis_name)
  X, D = operand_XD.shape
  Y = output_YD.shape[0]
  row_1M = jnp.arange(max_rows, dtype=jnp.int32)[None, :]
  src_NM = input_offsets_N[:, None] + row_1M
  sending_NM = row_1M < send_sizes_N[:, None]
  send_NMD = jnp.take(operand_XD, jnp.clip(src_NM, 0, X - 1), axis=0)
  send_NMD = jnp.where(sending_NM[:, :, None], send_NMD, jnp.zeros((), operand_XD.dtype))
  recv_NMD = jax.lax.all_to_all(send_NMD, axis_name, 0, 0, tiled=True)  # block n: from device n
  at_N = jax.lax.all_to_all(output_offsets_N, axis_name, 0, 0, tiled=True)  # where n's rows go
  dst_NM = jnp.where(row_1M < recv_sizes_N[:, None], at_N[:, None] + row_1M, Y)  # Y: dropped
  return output_YD.at[dst_NM.reshape(-1)].set(recv_NMD.reshape(-1, D), mode="drop")
