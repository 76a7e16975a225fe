"""Expert banks (E stacked FFNs) and the dense FFN used for shared experts.

Axis letters: E experts, D model dim, F hidden dim, X any rows (tokens, slots).

An `ExpertBank` module owns the parameters and returns them as `ExpertWeights`,
a pytree with two ways to run the experts, one per kind of dispatcher:
`batched` for a dense [E, X, D] buffer (einsum and dense dispatch) and `ragged`
for expert-sorted rows with per-expert counts (sorted dispatch, kernels).
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import validation as V
from moe_jax.config import ACTIVATIONS
from moe_jax.registry import Registry

# Expert types by name (MoEConfig.experts); a new type is one file in this package.
EXPERTS = Registry("experts", package="moe_jax.nn.experts")

# Fan-in scaled init per expert: the leading E axis is a batch axis.
expert_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))


def _activate(activation: str, up, gate):
  if activation == "swiglu":
    return jax.nn.silu(gate) * up
  if activation == "linear":  # low-rank adapters (experts/lora.py): y = (x @ A) @ B
    return up
  return jax.nn.gelu(up)


@flax.struct.dataclass
class ExpertWeights:
  """Stacked expert parameters, already cast to the compute dtype.

  SwiGLU: y = (silu(x @ w_gate) * (x @ w_up)) @ w_down; GELU: y = gelu(x @ w_up) @ w_down;
  "linear" (LoRA experts): y = (x @ w_up) @ w_down.
  """

  w_up_EDF: jax.Array
  w_down_EFD: jax.Array
  w_gate_EDF: jax.Array | None = None
  activation: str = flax.struct.field(pytree_node=False, default="swiglu")

  @property
  def num_experts(self) -> int:
    return self.w_up_EDF.shape[0]

  @property
  def d_model(self) -> int:
    return self.w_up_EDF.shape[1]

  def batched(self, x_EXD: jax.Array) -> jax.Array:
    """Expert e applied to row block x_EXD[e]."""
    up = jnp.einsum("EXD,EDF->EXF", x_EXD, self.w_up_EDF)
    gate = None
    if self.w_gate_EDF is not None:
      gate = jnp.einsum("EXD,EDF->EXF", x_EXD, self.w_gate_EDF)
    return jnp.einsum("EXF,EFD->EXD", _activate(self.activation, up, gate), self.w_down_EFD)

  def ragged(self, x_XD: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """Rows sorted by expert: the first group_sizes_E[0] rows go to expert 0, and so on.

    Rows past sum(group_sizes_E) are not computed; their output is unspecified.
    """
    up = jax.lax.ragged_dot(x_XD, self.w_up_EDF, group_sizes_E)
    gate = None
    if self.w_gate_EDF is not None:
      gate = jax.lax.ragged_dot(x_XD, self.w_gate_EDF, group_sizes_E)
    h = _activate(self.activation, up, gate).astype(self.w_down_EFD.dtype)
    return jax.lax.ragged_dot(h, self.w_down_EFD, group_sizes_E)


@EXPERTS.register("ffn")
class ExpertBank(nn.Module):
  """E independent FFNs of hidden width F; returns their `ExpertWeights`."""

  num_experts: int
  hidden_dim: int
  activation: str = "swiglu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, d_model: int) -> ExpertWeights:
    V.check_choice("activation", self.activation, ACTIVATIONS)
    E, D, F = self.num_experts, d_model, self.hidden_dim
    cast = lambda w: w.astype(self.dtype)
    w_gate = None
    if self.activation == "swiglu":
      w_gate = cast(self.param("w_gate_EDF", expert_init, (E, D, F), self.param_dtype))
    return ExpertWeights(
        w_up_EDF=cast(self.param("w_up_EDF", expert_init, (E, D, F), self.param_dtype)),
        w_down_EFD=cast(self.param("w_down_EFD", expert_init, (E, F, D), self.param_dtype)),
        w_gate_EDF=w_gate,
        activation=self.activation)


class FeedForward(nn.Module):
  """A dense FFN (SwiGLU or GELU): the non-MoE layers' FFN and the shared experts."""

  hidden_dim: int
  activation: str = "swiglu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    V.check_choice("activation", self.activation, ACTIVATIONS)
    D, F = x.shape[-1], self.hidden_dim
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    x = x.astype(self.dtype)
    w = lambda name, shape: self.param(name, init, shape, self.param_dtype).astype(self.dtype)
    up = x @ w("w_up_DF", (D, F))
    gate = x @ w("w_gate_DF", (D, F)) if self.activation == "swiglu" else None
    return _activate(self.activation, up, gate) @ w("w_down_FD", (F, D))
