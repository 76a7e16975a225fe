"""Meshes and expert parallelism on 8 simulated CPU devices (see conftest's XLA_FLAGS)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax import CapacityOptions, get_dispatcher
from moe_jax.expert_parallel import expert_parallel_ffn
from moe_jax.sharding import initialize_distributed, logical_to_spec, make_mesh
from tests.test_dispatch import random_decision, random_experts

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
T, D, F, E, K = 64, 8, 16, 8, 2


@needs_8
def test_mesh_shape_and_errors():
  mesh = make_mesh({"data": 2, "expert": 4})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "model": 1}
  with pytest.raises(ValueError, match=r"mesh data=2 x fsdp=1 x expert=2 x model=1 needs 4 "
                                       r"devices but 8 are available"):
    make_mesh({"data": 2, "expert": 2})
  with pytest.raises(ValueError, match=r"unknown mesh axes \['experts'\]"):
    make_mesh({"experts": 8})
  with pytest.raises(ValueError, match=r"mesh.model=0 must be >= 1"):
    make_mesh({"data": 8, "model": 0})


def test_logical_rules_and_single_host_init():
  assert logical_to_spec(("batch", None, "embed")) == P(("data", "fsdp", "expert"), None, "fsdp")
  with pytest.raises(ValueError, match="logical axis 'time' has no rule"):
    logical_to_spec(("time",))
  assert initialize_distributed() is False  # one process: nothing to join


def _ep(mesh, cf):
  return jax.jit(functools.partial(expert_parallel_ffn, mesh=mesh, capacity_factor=cf))


@needs_8
def test_expert_parallel_equals_single_device_dropless_outputs_and_gradients():
  mesh = make_mesh({"data": 2, "expert": 4})
  kx, ke, kd, kc = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (T, D))
  experts = random_experts(ke, num_experts=E, d=D, f=F)
  decision = random_decision(kd, t=T, num_experts=E, k=K, masked=True)
  cot = jax.random.normal(kc, (T, D))
  ep = _ep(mesh, float(E))  # capacity for every slot: nothing dropped
  y, dropped = ep(x, decision, experts)
  y_ref, _ = get_dispatcher("sorted")(x, decision, experts)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  assert float(dropped) == 0.0

  def loss(fn, x, w, ex):
    return jnp.sum(fn(x, decision.replace(weight_TK=w), ex)[0] * cot)

  args = (x, decision.weight_TK, experts)
  g_ep = jax.grad(functools.partial(loss, ep), argnums=(0, 1, 2))(*args)
  g_ref = jax.grad(functools.partial(loss, get_dispatcher("sorted")), argnums=(0, 1, 2))(*args)
  for a, b in zip(jax.tree.leaves(g_ep), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@needs_8
def test_expert_parallel_capacity_drops_like_einsum_per_device_groups():
  mesh = make_mesh({"data": 2, "expert": 4})
  kx, ke, kd = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (T, D))
  experts = random_experts(ke, num_experts=E, d=D, f=F)
  decision = random_decision(kd, t=T, num_experts=E, k=K)
  y, dropped = _ep(mesh, 0.5)(x, decision, experts)
  # 8 token shards of 8 tokens: the same as einsum with groups of 8.
  y_ref, m = get_dispatcher("einsum")(x, decision, experts,
                                      CapacityOptions(capacity_factor=0.5, group_size=T // 8))
  assert float(m["dropped_fraction"]) > 0
  np.testing.assert_allclose(dropped, m["dropped_fraction"], rtol=1e-6)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


@needs_8
def test_expert_parallel_rejects_indivisible_experts():
  mesh = make_mesh({"data": 2, "expert": 4})
  experts = random_experts(jax.random.key(0), num_experts=6, d=D, f=F)
  with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by mesh.expert=4"):
    expert_parallel_ffn(jnp.ones((T, D)), random_decision(jax.random.key(1), t=T, num_experts=6),
                        experts, mesh, capacity_factor=1.0)
