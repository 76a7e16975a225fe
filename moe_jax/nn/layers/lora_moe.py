"""A frozen dense FFN plus a routed mixture of LoRA adapters (layer "lora_moe").

MoLoRA (Zadouri et al., "Pushing Mixture of Experts to the Limit: Extremely Parameter
Efficient MoE for Instruction Tuning", arXiv:2309.05444) routes a pretrained layer's input
to LoRA experts and adds their gated sum to its output; here the adapted layer is the
whole FFN block (a parallel low-rank path beside it, not inside its three matrices):
  y = FFN(x) + sum_{k} g_k(x) * (x @ A_{e_k}) @ B_{e_k},
with FFN the pretrained dense layer (frozen by the trainer's `optimizer.trainable`
filter), A_e [D, R], B_e [R, D] (B zero at init: y = FFN(x) exactly) and g the router's
weights. The paper soft-merges all experts; here the router is any registered one
(top_k with k = num_experts is the paper's soft merge), so k < E makes it sparse.

Parameters: "mlp" holds the frozen FFN under the dense block's own names (w_up_DF,
w_gate_DF, w_down_FD), so a dense checkpoint's block_i/mlp maps onto block_i/moe/mlp;
"lora" is an MoELayer with the "lora" expert bank (rank R = MoEConfig.expert_hidden_dim)
whose router, dispatch, capacity, aux losses and expert parallelism are the usual ones.

Config: moe=dict(layer=dict(name="lora_moe", mlp_dim=<the model's mlp_dim>),
expert_hidden_dim=R, ...), with optimizer.trainable=("/lora/",) to train the adapters
and routers only. The frozen FFN's activation is MoEConfig.activation.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import validation as V
from moe_jax.config import MoEConfig
from moe_jax.nn.context import Context
from moe_jax.nn.experts import FeedForward
from moe_jax.nn.layers import MOE_LAYERS
from moe_jax.nn.layers.moe import MoELayer


@MOE_LAYERS.register("lora_moe")
class LoRAMoELayer(nn.Module):
  """FFN(x) (frozen by the trainable filter) + routed LoRA experts; see the module doc."""

  config: MoEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  mlp_dim: int | None = None  # the frozen FFN's hidden width: the model's mlp_dim

  @staticmethod
  def check_options(mlp_dim: int | None = None) -> None:
    if mlp_dim is None:
      raise ValueError("layer lora_moe needs mlp_dim (the frozen FFN's width, the model's "
                       "mlp_dim): layer=dict(name='lora_moe', mlp_dim=...)")
    V.check_int_range("layer.mlp_dim", mlp_dim, lo=1)

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True, context: Context | None = None,
               token_mask: jax.Array | None = None) -> jax.Array:
    self.check_options(self.mlp_dim)
    cfg = self.config
    dense = FeedForward(self.mlp_dim, cfg.activation, self.dtype, self.param_dtype, name="mlp")(x)
    adapters = MoELayer(dataclasses.replace(cfg, experts="lora", layer="moe"), self.dtype,
                        self.param_dtype, name="lora")(
        x, deterministic=deterministic, context=context, token_mask=token_mask)
    return dense.astype(self.dtype) + adapters
