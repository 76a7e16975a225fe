"""LoRA experts: E low-rank adapters as an expert bank (registered as "lora").

MoLoRA (Zadouri et al., "Pushing Mixture of Experts to the Limit: Extremely Parameter
Efficient MoE for Instruction Tuning", arXiv:2309.05444) adds to a frozen layer a routed
mixture of LoRA adapters (Hu et al., "LoRA: Low-Rank Adaptation of Large Language
Models", arXiv:2106.09685): expert e computes x @ A_e @ B_e with A_e [D, R], B_e [R, D],
and the layer adds sum_k g_k(x) * x @ A_{e_k} @ B_{e_k} to the frozen output. B starts at
zero, so at initialization the adapted model is exactly the frozen one.

Axis letters: E experts, D model dim, F the expert hidden width, here the LoRA rank R
(the legend gives R to buffer rows, so the rank keeps F, the axis sharding reads).

The adapters are `ExpertWeights` with activation "linear" (w_up_EDF = A, w_down_EFD = B),
so every dispatcher (einsum, sorted, tiled, pallas, dense) and expert parallelism run
them unchanged. The layer that pairs them with a frozen FFN is layers/lora_moe.py.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from moe_jax.nn.experts.ffn import EXPERTS, ExpertWeights, expert_init


@EXPERTS.register("lora")
class LoRAExperts(nn.Module):
  """E rank-`hidden_dim` adapters; `activation` is ignored (an adapter is linear)."""

  num_experts: int
  hidden_dim: int  # the rank R
  activation: str = "linear"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, d_model: int) -> ExpertWeights:
    E, D, R = self.num_experts, d_model, self.hidden_dim
    # A as LoRA's random down-projection (fan-in scaled per expert), B zero: delta W = 0.
    a = self.param("w_up_EDF", expert_init, (E, D, R), self.param_dtype)
    b = self.param("w_down_EFD", nn.initializers.zeros_init(), (E, R, D), self.param_dtype)
    return ExpertWeights(w_up_EDF=a.astype(self.dtype), w_down_EFD=b.astype(self.dtype),
                         activation="linear")
