"""Every dispatcher against the loop-over-experts references, outputs and gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_jax
from moe_jax import (CapacityOptions, ExpertWeights, RoutingDecision, assign_capacity_slots,
                     get_dispatcher, token_choice_capacity)
from tests import reference

T, D, F, E, K = 24, 8, 16, 4, 2
DISPATCHERS = moe_jax.DISPATCHERS.names()  # every registered dispatcher
ROOMY = CapacityOptions(capacity_factor=float(E), group_size=None)  # nothing dropped


def random_experts(key, activation="swiglu", dtype=jnp.float32, num_experts=E, d=D, f=F):
  k1, k2, k3 = jax.random.split(key, 3)
  w = lambda k, shape, fan_in: (jax.random.normal(k, shape) / np.sqrt(fan_in)).astype(dtype)
  return ExpertWeights(w_up_EDF=w(k1, (num_experts, d, f), d),
                       w_down_EFD=w(k2, (num_experts, f, d), f),
                       w_gate_EDF=w(k3, (num_experts, d, f), d) if activation == "swiglu" else None,
                       activation=activation)


def random_decision(key, t=T, num_experts=E, k=K, masked=False):
  """Distinct experts per token, random weights; with `masked`, some slots unused."""
  k1, k2, k3 = jax.random.split(key, 3)
  index_TK = jax.vmap(lambda kk: jax.random.permutation(kk, num_experts)[:k])(
      jax.random.split(k1, t)).astype(jnp.int32)
  weight_TK = jax.random.uniform(k2, (t, k), minval=0.1, maxval=1.0)
  mask = jax.random.bernoulli(k3, 0.7, (t, k)) if masked else None
  return RoutingDecision(expert_index_TK=index_TK, weight_TK=weight_TK, mask_TK=mask)


@pytest.mark.parametrize("masked", [False, True], ids=["top_k", "masked_slots"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("name", DISPATCHERS)
def test_dispatch_matches_loop_reference_f32(name, activation, masked):
  kx, ke, kd = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (T, D))
  experts = random_experts(ke, activation)
  d = random_decision(kd, masked=masked)
  y, metrics = get_dispatcher(name)(x, d, experts, ROOMY)
  want = reference.np_moe(x, d.expert_index_TK, d.weight_TK, d.valid_TK(), experts)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert float(metrics["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("name", DISPATCHERS)
def test_dispatch_matches_loop_reference_bf16(name):
  kx, ke, kd = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (T, D))
  experts32 = random_experts(ke)
  experts16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), experts32)
  d = random_decision(kd)
  y, _ = get_dispatcher(name)(x.astype(jnp.bfloat16), d, experts16, ROOMY)
  assert y.dtype == jnp.bfloat16
  want = reference.np_moe(x, d.expert_index_TK, d.weight_TK, d.valid_TK(), experts32)
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", DISPATCHERS)
def test_dispatch_gradients_match_loop_reference(name):
  """d/dx, d/dweights (router side) and d/dexpert params of a scalar loss."""
  kx, ke, kd, kc = jax.random.split(jax.random.key(2), 4)
  x = jax.random.normal(kx, (T, D))
  experts = random_experts(ke)
  d = random_decision(kd, masked=True)
  cot = jax.random.normal(kc, (T, D))

  ours = lambda x, w, ex: get_dispatcher(name)(x, d.replace(weight_TK=w), ex, ROOMY)[0]
  ref = lambda x, w, ex: reference.jnp_loop_moe(x, d.expert_index_TK, w, d.valid_TK(), ex)
  args = (x, d.weight_TK, experts)
  g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums=(0, 1, 2))(*args)
  g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * cot), argnums=(0, 1, 2))(*args)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("priority", [False, True])
def test_einsum_drops_exactly_the_slots_past_capacity(priority):
  kx, ke, kd, kp = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(kx, (T, D))
  experts = random_experts(ke)
  # Skewed routing: experts 0/1 are popular, so capacity overflows.
  index_TK = jnp.stack([jax.random.randint(kd, (T,), 0, 2), jnp.full((T,), 3)], 1)
  prio = jax.random.uniform(kp, (T,)) if priority else None
  d = RoutingDecision(expert_index_TK=index_TK.astype(jnp.int32),
                      weight_TK=jax.random.uniform(kd, (T, K)), priority_T=prio)
  opts = CapacityOptions(capacity_factor=1.0, group_size=8)
  C = token_choice_capacity(8, K, E, 1.0)  # ceil(8 * 2 / 4) = 4
  assert C == 4
  y, metrics = get_dispatcher("einsum")(x, d, experts, opts)
  keep = reference.np_capacity_keep(index_TK, np.ones((T, K), bool), 8, C, prio)
  assert 0 < keep.sum() < T * K  # the case really overflows
  np.testing.assert_allclose(metrics["dropped_fraction"], 1 - keep.mean(), rtol=1e-6)
  want = reference.np_moe(x, index_TK, d.weight_TK, keep, experts)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_group_size_must_divide_tokens():
  x = jnp.ones((T, D))
  with pytest.raises(ValueError, match="group_size=5"):
    get_dispatcher("einsum")(x, random_decision(jax.random.key(0)), random_experts(
        jax.random.key(1)), CapacityOptions(group_size=5))


def test_dispatch_rejects_mismatched_shapes():
  experts = random_experts(jax.random.key(1))
  d = random_decision(jax.random.key(0))
  with pytest.raises(ValueError, match="T=24 tokens but x_TD has T=12"):
    get_dispatcher("sorted")(jnp.ones((12, D)), d, experts)
  with pytest.raises(ValueError, match="model dim D=5"):
    get_dispatcher("sorted")(jnp.ones((T, 5)), d, experts)
  with pytest.raises(ValueError, match="rank 2"):
    get_dispatcher("dense")(jnp.ones((2, T, D)), d, experts)


def test_unknown_dispatcher_names_the_choices():
  with pytest.raises(ValueError, match="dispatch='scatter'.*'einsum', 'sorted', 'dense'"):
    get_dispatcher("scatter")


def test_sorted_dispatch_handles_empty_experts_and_one_hot_expert():
  # Every token picks expert 2 first: experts 0 gets nothing at rank 0.
  kx, ke = jax.random.split(jax.random.key(4))
  x = jax.random.normal(kx, (T, D))
  experts = random_experts(ke)
  index = jnp.stack([jnp.full((T,), 2), jnp.full((T,), 3)], 1).astype(jnp.int32)
  d = RoutingDecision(expert_index_TK=index, weight_TK=jnp.full((T, K), 0.5))
  y, _ = get_dispatcher("sorted")(x, d, experts)
  want = reference.np_moe(x, index, d.weight_TK, np.ones((T, K), bool), experts)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", DISPATCHERS)
def test_jit_and_eager_agree(name):
  kx, ke, kd = jax.random.split(jax.random.key(5), 3)
  x = jax.random.normal(kx, (T, D))
  experts, d = random_experts(ke), random_decision(kd, masked=True)
  fn = functools.partial(get_dispatcher(name), capacity=ROOMY)
  eager, _ = fn(x, d, experts)
  jitted, _ = jax.jit(fn)(x, d, experts)
  np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-6)
