"""LoRA experts expert-parallel on a data=2 x expert=4 mesh equal the single-device layer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax.config import MoEConfig
from moe_jax.nn.layers import make_moe_layer
from moe_jax.parallel.sharding import make_mesh


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_lora_moe_on_mesh_equals_single_device_outputs_and_gradients():
  cfg = MoEConfig(num_experts=8, expert_hidden_dim=4, router=dict(name="top_k", k=2),
                  dispatch="tiled", layer=dict(name="lora_moe", mlp_dim=16))
  layer = make_moe_layer(cfg, jnp.float32, jnp.float32)
  kx, kp, kb, kc = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (4, 6, 8))  # 24 tokens: 3 per token shard
  params = layer.init(kp, x)["params"]
  b = params["lora"]["experts"]["w_down_EFD"]
  params["lora"]["experts"]["w_down_EFD"] = jax.random.normal(kb, b.shape)  # adapters on
  cot = jax.random.normal(kc, x.shape)
  loss = lambda p, x: jnp.sum(layer.apply({"params": p}, x) * cot)
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  loss_1, grads_1 = fn(params, x)
  mesh = make_mesh({"data": 2, "expert": 4})
  with jax.set_mesh(mesh):
    params_m, x_m = jax.device_put((params, x), NamedSharding(mesh, P()))
    (loss_m, grads_m), hlo = fn(params_m, x_m), fn.lower(params_m, x_m).as_text()
  assert "all_to_all" in hlo  # the adapters really ran expert-parallel
  np.testing.assert_allclose(loss_m, loss_1, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads_m)[0],
                          jax.tree.leaves(grads_1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
