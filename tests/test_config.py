"""Bad input fails early with a ValueError naming the field, value and what is allowed."""
import jax
import jax.numpy as jnp
import pytest

from moe_jax import (ExpertBank, ExpertChoiceRouter, MoEConfig, MoELayer, TopKRouter,
                     TransformerConfig)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=4, k=5), r"k=5 is out of range; allowed: 1 <= k <= 4"),
    (dict(k=0), r"k=0 is out of range; allowed: 1 <= k <= 8"),
    (dict(num_experts=0), r"num_experts=0 is out of range; allowed: 1 <= num_experts"),
    (dict(capacity_factor=0.0), r"capacity_factor=0.0 must be a number > 0"),
    (dict(capacity_factor=-1), r"capacity_factor=-1 must be a number > 0"),
    (dict(eval_capacity_factor=0), r"eval_capacity_factor=0 must be a number > 0"),
    (dict(router="switch"), r"router='switch' is not supported; allowed: 'top_k', 'expert_choice'"),
    (dict(dispatch="fast"), r"dispatch='fast' is not supported; allowed: 'einsum', 'sorted'"),
    (dict(activation="relu"), r"activation='relu' is not supported; allowed: 'swiglu', 'gelu'"),
    (dict(jitter=1.5), r"jitter=1.5 must be a number in \[0, 1\)"),
    (dict(group_size=0), r"group_size=0 is out of range"),
    (dict(expert_hidden_dim=2.5), r"expert_hidden_dim=2.5 must be an integer"),
    (dict(z_loss_weight=-1.0), r"z_loss_weight=-1.0 must be >= 0"),
])
def test_moe_config_rejects(kwargs, message):
  with pytest.raises(ValueError, match=message):
    MoEConfig(**kwargs)


def test_expert_choice_ignores_k():
  assert MoEConfig(router="expert_choice", num_experts=2, k=5).k == 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=30, num_heads=4), r"d_model=30 is not divisible by num_heads=4"),
    (dict(num_layers=0), r"num_layers=0 is out of range"),
    (dict(moe_every=2), r"moe=None"),
    (dict(moe=MoEConfig(), moe_last=9, num_layers=4), r"moe_last=9 is out of range"),
    (dict(moe=MoEConfig(), moe_layers=(4,), num_layers=4), r"moe_layers\[i\]=4 is out of range"),
    (dict(causal=True, d_model=12, num_heads=4), r"head_dim=3 must be even for RoPE"),
    (dict(activation="tanh"), r"activation='tanh' is not supported"),
])
def test_transformer_config_rejects(kwargs, message):
  with pytest.raises(ValueError, match=message):
    TransformerConfig(**kwargs)


@pytest.mark.parametrize("module, message", [
    (TopKRouter(num_experts=4, k=5), r"k=5 is out of range"),
    (TopKRouter(num_experts=0, k=1), r"num_experts=0 is out of range"),
    (ExpertChoiceRouter(num_experts=4, capacity_factor=0.0), r"capacity_factor=0.0"),
    (ExpertChoiceRouter(num_experts=4, group_size=3), r"group_size=3 does not divide .* T=8"),
])
def test_routers_reject_bad_settings_when_called(module, message):
  with pytest.raises(ValueError, match=message):
    module.init(jax.random.key(0), jnp.ones((8, 4)))


def test_router_rejects_wrong_rank():
  with pytest.raises(ValueError, match=r"rank 2 \(tokens, model dim\); got shape \(2, 4, 4\)"):
    TopKRouter(num_experts=4, k=1).init(jax.random.key(0), jnp.ones((2, 4, 4)))


def test_expert_bank_rejects_unknown_activation():
  with pytest.raises(ValueError, match="activation='relu'"):
    ExpertBank(num_experts=2, hidden_dim=4, activation="relu").init(jax.random.key(0), 4)


def test_layer_rejects_non_config_and_scalar_input():
  with pytest.raises(ValueError, match="must be a MoEConfig"):
    MoELayer({"num_experts": 4}).init(jax.random.key(0), jnp.ones((4, 4)))
  with pytest.raises(ValueError, match=r"must be \[..., D\]"):
    MoELayer(MoEConfig()).init(jax.random.key(0), jnp.ones((4,)))
