"""Residual MoE: a dense MLP beside the MoE, mixed per token by a learned 2-way gate
(Rajbhandari et al., "DeepSpeed-MoE: Advancing Mixture-of-Experts Inference and Training
to Power Next-Generation AI Scale", arXiv:2201.05596: Residual-MoE, part of PR-MoE).

Axis letters: D model dim (the gate's w_D2 has a stacked axis of 2: MoE, MLP).

  [c0, c1] = softmax(x @ w_D2)          (float32, per token)
  y = MoE(x) * c0 + MLP(x) * c1

The paper fixes one dense MLP per layer and lets routing pick the second, "error
correcting" expert; the DeepSpeed library (deepspeed.moe.layer.MoE, use_residual=True)
mixes the two branches with this learned coefficient. The MoE branch is the registered
"moe" layer (MoELayer) as a submodule, so every router, dispatcher and the expert-parallel
paths work unchanged, and its aux losses and metrics are sown as usual. The MLP runs
on every token (padding included, as shared experts do).

Selected by `MoEConfig.layer = dict(name="residual", mlp_hidden_dim=None)`; None means
the experts' hidden width (expert_hidden_dim).
"""
from __future__ import annotations

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


@MOE_LAYERS.register("residual")
class ResidualMoELayer(nn.Module):
  """MoE(x) * c0 + MLP(x) * c1 with [c0, c1] = softmax(x @ w_D2); see the module docstring."""

  config: MoEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  mlp_hidden_dim: int | None = None  # the dense MLP's width; None: expert_hidden_dim

  @staticmethod
  def check_options(mlp_hidden_dim: int | None = None) -> None:
    if mlp_hidden_dim is not None:
      V.check_int_range("layer.mlp_hidden_dim", mlp_hidden_dim, lo=1)

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True, context: Context | None = None,
               token_mask: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    moe = MoELayer(cfg, self.dtype, self.param_dtype, name="moe")(
        x, deterministic=deterministic, context=context, token_mask=token_mask)
    mlp = FeedForward(self.mlp_hidden_dim or cfg.expert_hidden_dim, cfg.activation, self.dtype,
                      self.param_dtype, name="mlp")(x)
    w_D2 = self.param("coefficient_w_D2", nn.initializers.lecun_normal(), (x.shape[-1], 2),
                      self.param_dtype)
    coef = jax.nn.softmax(x.astype(jnp.float32) @ w_D2.astype(jnp.float32), axis=-1)
    coef = coef.astype(self.dtype)
    return (moe * coef[..., :1] + mlp * coef[..., 1:]).astype(self.dtype)
