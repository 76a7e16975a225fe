"""Bad input fails early with a ValueError naming the field, value and what is allowed."""
import jax
import jax.numpy as jnp
import pytest

from moe_jax import (ExpertBank, ExpertChoiceRouter, MoEConfig, MoELayer, TopKRouter,
                     TransformerConfig)


TOP_K = lambda **kw: dict(name="top_k", **kw)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=4, router=TOP_K(k=5)), r"k=5 is out of range; allowed: 1 <= k <= 4"),
    (dict(router=TOP_K(k=0)), r"k=0 is out of range; allowed: 1 <= k <= 8"),
    (dict(num_experts=0), r"num_experts=0 is out of range; allowed: 1 <= num_experts"),
    (dict(capacity_factor=0.0), r"capacity_factor=0.0 must be a number > 0"),
    (dict(capacity_factor=-1), r"capacity_factor=-1 must be a number > 0"),
    (dict(eval_capacity_factor=0), r"eval_capacity_factor=0 must be a number > 0"),
    (dict(router="switch"), r"router='switch' is not registered; registered: 'top_k', "
                            r"'expert_choice'"),
    (dict(router=dict(k=2)), r"router=\{'k': 2\} needs a 'name'"),
    (dict(router=TOP_K(kk=2)), r"unknown option\(s\) \['kk'\] for router 'top_k'; valid: k, "
                               r"score, renormalize, routed_scaling_factor, n_group, topk_group, "
                               r"bias_update_rate, balance_count, balance_scope, batch_priority, "
                               r"jitter, fused, null_experts$"),
    (dict(dispatch="fast"), r"dispatch='fast' is not registered; registered: 'einsum', 'sorted'"),
    (dict(experts="lora9"), r"experts='lora9' is not registered; registered: 'ffn'"),
    (dict(activation="relu"), r"activation='relu' is not supported; allowed: 'swiglu', 'gelu'"),
    (dict(router=TOP_K(jitter=1.5)), r"jitter=1.5 must be a number in \[0, 1\)"),
    (dict(group_size=0), r"group_size=0 is out of range"),
    (dict(expert_hidden_dim=2.5), r"expert_hidden_dim=2.5 must be an integer"),
    (dict(z_loss_weight=-1.0), r"z_loss_weight=-1.0 must be >= 0"),
])
def test_moe_config_rejects(kwargs, message):
  with pytest.raises(ValueError, match=message):
    MoEConfig(**kwargs)


def test_expert_choice_rejects_k():
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['k'\] for router "
                                       r"'expert_choice'; valid: jitter"):
    MoEConfig(router=dict(name="expert_choice", k=5), num_experts=2)


def test_options_that_moved_into_the_router_say_where_they_went():
  with pytest.raises(ValueError, match=r"k, renormalize moved into the router's options: "
                                       r"e.g. moe.router=dict\(name='top_k', k=2\)"):
    MoEConfig.from_dict(dict(k=2, renormalize=False))


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


@pytest.mark.parametrize("make, message", [
    (lambda: TopKRouter(num_experts=4, k=5), r"k=5 is out of range"),
    (lambda: TopKRouter(num_experts=0, k=1), r"num_experts=0 is out of range"),
    (lambda: ExpertChoiceRouter(num_experts=4, capacity_factor=0.0), r"capacity_factor=0.0"),
    (lambda: ExpertChoiceRouter(num_experts=4, group_size=3),
     r"group_size=3 does not divide .* T=8"),
])
def test_routers_reject_bad_settings(make, message):
  with pytest.raises(ValueError, match=message):  # at construction, or at the first call
    make().init(jax.random.key(0), jnp.ones((8, 4)))


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
