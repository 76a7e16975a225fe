"""The null-expert top_k router (AdaMoE) and the dense-to-sparse gate (EvoMoE) on a
data=2 x expert=4 mesh of simulated CPU devices: the MoE layer's outputs, gradients and
router state equal one device's, with the experts run expert-parallel."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import MoEConfig, MoELayer
from moe_jax.nn.routing import ROUTER_STATE
from moe_jax.parallel.sharding import make_mesh

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def _run(layer, variables, x, cot, mesh=None):
  """(loss, grads, new router state) of a training call, and the HLO on the mesh."""

  def loss(params, x):
    y, state = layer.apply({**variables, "params": params}, x, deterministic=False,
                           rngs={"jitter": jax.random.key(7)}, mutable=[ROUTER_STATE])
    return jnp.sum(y * cot), state

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  params = variables["params"]
  if mesh is None:
    return fn(params, x), None
  with jax.set_mesh(mesh):
    params, x = jax.device_put((params, x), NamedSharding(mesh, P()))
    return fn(params, x), fn.lower(params, x).as_text()


@needs_8
@pytest.mark.parametrize("router", [
    dict(name="top_k", k=3, null_experts=2),
    dict(name="dense_to_sparse", tau_max=2.0, tau_min=0.5, anneal_steps=4, threshold=0.1),
], ids=["null_experts", "dense_to_sparse"])
def test_layer_on_mesh_equals_single_device(router):
  cfg = MoEConfig(num_experts=8, expert_hidden_dim=16, dispatch="sorted", router=router)
  layer = MoELayer(cfg)
  kx, kp, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (4, 6, 8))  # 24 tokens: 3 per token shard
  variables = layer.init(kp, x)
  cot = jax.random.normal(kc, x.shape)
  ((loss_1, state_1), grads_1), _ = _run(layer, variables, x, cot)
  ((loss_m, state_m), grads_m), hlo = _run(layer, variables, x, cot,
                                           make_mesh({"data": 2, "expert": 4}))
  assert "all_to_all" in hlo  # the experts really ran expert-parallel
  # The loss sums 192 products of both signs: f32 summed in another order (per machine,
  # per vector width) moves it by ~1e-6 absolute (AMD EPYC AVX2: 1.5e-6 on a 0.049 loss).
  np.testing.assert_allclose(loss_m, loss_1, rtol=1e-5, atol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads_m)[0],
                          jax.tree.leaves(grads_1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  for a, b in zip(jax.tree.leaves(state_m), jax.tree.leaves(state_1)):
    np.testing.assert_array_equal(a, b)
  if router["name"] == "dense_to_sparse":
    assert int(state_m[ROUTER_STATE]["router"]["calls"]) == 1
