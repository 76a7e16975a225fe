"""Residual MoE (DeepSpeed-MoE, arXiv:2201.05596) against a reference assembled from its parts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import MoEConfig, MoELayer
from moe_jax.nn.layers import make_moe_layer
from moe_jax.parallel.sharding import make_mesh

B, S, D, E, F = 2, 6, 8, 4, 16
MASK = np.ones((B, S), bool)
MASK[1, 5:] = False


def _cfg(dispatch, **layer):
  return MoEConfig(num_experts=E, expert_hidden_dim=F, router=dict(name="top_k", k=2),
                   dispatch=dispatch, layer=dict(name="residual", **layer))


def reference(p, x, mask, cfg, mlp_hidden):
  """The MoE branch is MoELayer (tested on its own in test_layers.py) on its parameters;
  the MLP (SwiGLU) and the 2-way softmax gate are written out here."""
  moe = MoELayer(cfg).apply({"params": p["moe"]}, x, token_mask=mask)
  m = p["mlp"]
  assert m["w_up_DF"].shape == (D, mlp_hidden)
  mlp = (jax.nn.silu(x @ m["w_gate_DF"]) * (x @ m["w_up_DF"])) @ m["w_down_FD"]
  logits = x @ p["coefficient_w_D2"]
  c = jnp.exp(logits) / jnp.exp(logits).sum(-1, keepdims=True)
  return moe * c[..., 0:1] + mlp * c[..., 1:2]


@pytest.mark.parametrize("dispatch, layer, mlp_hidden", [
    ("sorted", {}, F),  # the MLP defaults to the experts' width
    ("tiled", dict(mlp_hidden_dim=12), 12),
])
def test_matches_reference_from_parts_outputs_and_gradients(dispatch, layer, mlp_hidden):
  cfg = _cfg(dispatch, **layer)
  mod = make_moe_layer(cfg, jnp.float32, jnp.float32)
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  mask = jnp.asarray(MASK)
  params = mod.init(jax.random.key(1), x, token_mask=mask)["params"]
  assert set(params) == {"moe", "mlp", "coefficient_w_D2"}
  cot = jax.random.normal(jax.random.key(2), x.shape)
  ours = lambda p, x: mod.apply({"params": p}, x, token_mask=mask)
  y = ours(params, x)
  np.testing.assert_allclose(y, reference(params, x, mask, cfg, mlp_hidden), rtol=1e-5,
                             atol=1e-5)
  g_ours = jax.grad(lambda p, x: jnp.sum(ours(p, x) * cot), argnums=(0, 1))(params, x)
  g_ref = jax.grad(lambda p, x: jnp.sum(reference(p, x, mask, cfg, mlp_hidden) * cot),
                   argnums=(0, 1))(params, x)
  assert jax.tree.structure(g_ours) == jax.tree.structure(g_ref)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_ours)[0], jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(g_ours[0]["coefficient_w_D2"]).sum()) > 0  # the gate learns
  # The output is neither branch alone.
  moe_only = MoELayer(cfg).apply({"params": params["moe"]}, x, token_mask=mask)
  assert float(jnp.abs(y - moe_only).max()) > 1e-3


def test_moe_branch_sows_its_aux_loss_and_metrics():
  cfg = _cfg("sorted")
  mod = make_moe_layer(cfg, jnp.float32, jnp.float32)
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  params = mod.init(jax.random.key(1), x)["params"]
  _, coll = mod.apply({"params": params}, x, mutable=["aux_loss", "moe_metrics"])
  _, want = MoELayer(cfg).apply({"params": params["moe"]}, x, mutable=["aux_loss"])
  np.testing.assert_allclose(coll["aux_loss"]["moe"]["moe"][0], want["aux_loss"]["moe"][0])
  assert "load_balance_loss" in coll["moe_metrics"]["moe"]["moe"][0]


def test_bad_mlp_width_fails_at_config_build():
  with pytest.raises(ValueError, match=r"^layer.mlp_hidden_dim=0 is out of range"):
    _cfg("sorted", mlp_hidden_dim=0)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_on_a_data_2_expert_4_mesh_equals_one_device():
  cfg = _cfg("sorted")
  mod = make_moe_layer(cfg, jnp.float32, jnp.float32)
  x = jax.random.normal(jax.random.key(0), (4, S, D))
  params = mod.init(jax.random.key(1), x)["params"]
  cot = jax.random.normal(jax.random.key(2), x.shape)
  fn = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(mod.apply({"params": p}, x) * cot),
                                  argnums=(0, 1)))
  loss_1, grads_1 = fn(params, x)
  mesh = make_mesh({"data": 2, "expert": 4})
  with jax.set_mesh(mesh):
    args = jax.device_put((params, x), NamedSharding(mesh, P()))
    loss_m, grads_m = fn(*args)
    hlo = fn.lower(*args).as_text()
  assert "all_to_all" in hlo  # the MoE branch ran expert-parallel
  np.testing.assert_allclose(loss_m, loss_1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_m), jax.tree.leaves(grads_1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
