"""Training on a mesh of 8 simulated CPU devices (conftest's XLA_FLAGS) equals one device."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.configs import imp_tiny
from moe_jax import MoEConfig, MoELayer, models
from moe_jax.data import make_source
from moe_jax.parallel.partitioning import (global_batch, param_logical_axes, spec_for,
                                           state_shardings)
from moe_jax.parallel.sharding import make_mesh
from moe_jax.train import agd, train_and_evaluate
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.step import init_train_state, make_optimizer
from tests.train.test_train import imp_config

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
K = jax.tree_util.DictKey


def test_param_logical_axes_from_names_and_shapes():
  axes = lambda name, shape: param_logical_axes((K("layer"), K(name)), shape)
  assert axes("w_up_EDF", (4, 8, 16)) == ("expert", "embed", "mlp")
  assert axes("w_down_EFD", (3, 4, 16, 8)) == (None, "expert", "mlp", "embed")  # scanned
  assert axes("w_DE", (8, 4)) == ("embed", None)  # a router's experts axis stays whole
  assert axes("w_qkv_D3HQ", (8, 3, 2, 4)) == ("embed", None, "heads", None)
  assert axes("kernel", (8, 10)) == ("embed", None)
  assert axes("embedding", (256, 8)) == ("vocab", "embed")
  assert axes("position_axis0", (16, 8)) == (None, None)
  assert axes("bias", (8,)) == (None,)


@needs_8
def test_specs_follow_rules_and_replicate_what_does_not_divide():
  mesh = make_mesh({"fsdp": 2, "expert": 4})
  assert spec_for(mesh, ("expert", "embed", "mlp"), (8, 6, 16)) == P("expert", "fsdp", None)
  assert spec_for(mesh, ("embed", None), (7, 10)) == P(None, None)  # 7 rows: not over fsdp=2
  batch = global_batch(mesh, {"image": np.zeros((16, 4, 4, 1)), "label": np.arange(16)})
  assert batch["label"].sharding.spec == P(("data", "fsdp", "expert"))
  assert batch["image"].addressable_shards[0].data.shape == (2, 4, 4, 1)


def _layer_and_grads(cfg, x, params, cot, mesh=None):
  layer = MoELayer(cfg)

  def loss(params, x):
    y = layer.apply({"params": params}, x, deterministic=False)
    return jnp.sum(y * cot)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  if mesh is None:
    return fn(params, x), None
  with jax.set_mesh(mesh):
    rep = NamedSharding(mesh, P())
    params, x = jax.device_put((params, x), rep)
    return fn(params, x), fn.lower(params, x).as_text()


@needs_8
@pytest.mark.parametrize("cfg", [
    MoEConfig(num_experts=8, router=dict(name="top_k", k=2), expert_hidden_dim=16,
              dispatch="sorted"),  # -> dropless
    MoEConfig(num_experts=4, router="expert_choice", dispatch="einsum", sequence_groups=True,
              expert_hidden_dim=16, capacity_factor=1.0),  # imp_tiny's layer -> capacity
], ids=["top_k_sorted", "expert_choice_einsum"])
def test_moe_layer_on_mesh_equals_single_device_outputs_and_gradients(cfg):
  kx, kp, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (4, 6, 8))  # 24 tokens: 3 per token shard
  params = MoELayer(cfg).init(kp, x)["params"]
  cot = jax.random.normal(kc, x.shape)
  (loss_1, grads_1), _ = _layer_and_grads(cfg, x, params, cot)
  (loss_m, grads_m), hlo = _layer_and_grads(cfg, x, params, cot, make_mesh({"data": 2,
                                                                            "expert": 4}))
  assert "all_to_all" in hlo  # the experts really ran expert-parallel
  np.testing.assert_allclose(loss_m, loss_1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_m), jax.tree.leaves(grads_1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _one_task_config(**mesh):
  c = imp_config(("image_cls",), num_steps=2, log_every=1, eval_every=100, checkpoint_every=1)
  del c.tasks.image_cls["eval_source"]  # no eval: two compiles per run (init, step)
  c.tasks.image_cls.batch_size = 16
  c.mesh.update(mesh)
  return c


def _params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return jax.device_get(ocp.StandardCheckpointer().restore(path)["params"])


@needs_8
def test_agd_train_step_on_mesh_equals_single_device(tmp_path):
  one, mesh = str(tmp_path / "one"), str(tmp_path / "mesh")
  s1 = train_and_evaluate(_one_task_config(), one)
  sm = train_and_evaluate(_one_task_config(data=2, expert=4), mesh)
  assert sm["mesh"] == {"data": 2, "fsdp": 1, "expert": 4, "model": 1}
  assert sm["compiles"] == {"image_cls": 1}  # two steps, one compile, as on one device
  for step in (1, 2):
    p1, pm = _params(one, step), _params(mesh, step)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(pm)[0], jax.tree.leaves(p1)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))
  h1, hm = s1["train_history"][-1], sm["train_history"][-1]
  np.testing.assert_allclose(hm["train/image_cls/loss"], h1["train/image_cls/loss"], rtol=1e-5)


@needs_8
def test_sharded_init_places_experts_and_fsdp_shards():
  c = imp_tiny.get_config("smoke")
  model = models.build_model(c.model)
  task = agd.tasks_from_config({"image_cls": c.tasks.image_cls},
                              lambda spec, kw: make_source(spec, **kw))[0]
  src = make_source(task.source)
  x = {k: np.stack([src[i][k] for i in range(16)]) for k in ("image", "label")}
  mesh = make_mesh({"fsdp": 2, "expert": 4})
  with jax.set_mesh(mesh):
    tx = make_optimizer(c.optimizer, 10)
    state, shardings = init_train_state(model, tx, {"image_cls": global_batch(mesh, x)}, [task], 0,
                                        mesh)
  w_up = state.params["encoder"]["layers"]["block_1"]["moe"]["experts"]["w_up_EDF"]
  assert w_up.sharding.spec == P("expert", "fsdp", None)
  assert w_up.addressable_shards[0].data.shape == (1, 32, 128)  # [4, 64, 128] / (4, 2, 1)
  mu = state.opt_state[1][0].mu["encoder"]["layers"]["block_1"]["moe"]["experts"]["w_up_EDF"]
  assert mu.sharding.spec == P("expert", "fsdp", None)
  qkv = state.params["encoder"]["layers"]["block_0"]["attention"]["w_qkv_D3HQ"]
  assert qkv.sharding.spec == P("fsdp", None, None, None)
  assert shardings.params["encoder"]["layers"]["block_0"]["attention"]["w_qkv_D3HQ"] == qkv.sharding


@needs_8
def test_checkpoint_written_on_one_mesh_restores_onto_others(tmp_path):
  devices = jax.devices()
  save_mesh = make_mesh({"data": 2, "expert": 4})
  tree = {"experts": {"w_up_EDF": jnp.arange(4 * 6 * 8.0).reshape(4, 6, 8)},
          "dense": {"kernel": jnp.arange(8 * 3.0).reshape(8, 3)}, "step": jnp.array(7),
          # Router state (a balancing bias) is sharded and restored like the parameters.
          "router_state": {"moe": {"router": {"bias_E": jnp.array([0.1, -0.2, 0.0, 0.3])}}}}
  abstract = jax.eval_shape(lambda: tree)
  saved = jax.device_put(tree, state_shardings(save_mesh, abstract))
  assert saved["experts"]["w_up_EDF"].sharding.spec == P("expert", None, None)
  assert saved["router_state"]["moe"]["router"]["bias_E"].sharding.spec == P("expert")
  ckpt = Checkpointer(str(tmp_path))
  ckpt.save(1, saved, {"it": {"position": 3}})
  for mesh in (make_mesh({"data": 4, "expert": 2}), make_mesh({}, devices[:1])):
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, state_shardings(mesh, abstract))
    restored, data = ckpt.restore(1, target)
    assert data == {"it": {"position": 3}}
    for got, want, s in zip(jax.tree.leaves(restored), jax.tree.leaves(tree),
                            jax.tree.leaves(state_shardings(mesh, abstract))):
      assert got.sharding == s
      np.testing.assert_array_equal(got, want)
  ckpt.close()


@needs_8
@pytest.mark.parametrize("overrides, message", [
    (dict(data=3), r"mesh data=3 x fsdp=1 x expert=1 x model=1 needs 3 devices but 8 are "
                   r"available"),
    (dict(data=1, expert=8), r"model.moe.num_experts=4 is not divisible by mesh.expert=8"),
    (dict(data=8, batch=12), r"task 'image_cls': batch_size=12 is not divisible by the 8 batch "
                             r"shards of mesh data=8 x fsdp=1 x expert=1"),
    (dict(data=8, eval_batch=12), r"task 'image_cls': eval_batch_size=12 is not divisible by "
                                  r"the 8 batch shards"),
    (dict(experts=8), r"unknown mesh axes \['experts'\]"),
])
def test_bad_mesh_configs_fail_with_one_line_errors(tmp_path, overrides, message):
  batch, eval_batch = overrides.pop("batch", None), overrides.pop("eval_batch", None)
  c = _one_task_config()
  c.mesh.update(overrides)
  if batch:
    c.tasks.image_cls.batch_size = batch
  if eval_batch:  # fails before training, not at the first eval
    c.tasks.image_cls.eval_source = "digits_image:test"
    c.tasks.image_cls.eval_batch_size = eval_batch
  with pytest.raises(ValueError, match=message):
    train_and_evaluate(c, str(tmp_path))


def test_global_batch_balance_loss_is_equal_on_one_and_eight_data_devices():
  """The router sees the whole global batch under jit, so the balance loss counts expert
  frequencies over all of it (Qwen's global-batch loss, arXiv:2501.11873), wherever the
  tokens live; the mean of per-device (micro-batch) losses is a different number."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from moe_jax import sum_aux_losses
  cfg = MoEConfig(num_experts=4, router=dict(name="top_k", k=2), expert_hidden_dim=8,
                  load_balance_weight=1.0, z_loss_weight=0.0)
  layer = MoELayer(cfg)
  x = jax.random.normal(jax.random.key(0), (8, 4, 8))
  params = layer.init(jax.random.key(1), x)["params"]

  def loss(p, x):
    return sum_aux_losses(layer.apply({"params": p}, x, mutable=["aux_loss"])[1])

  one_loss, one_grads = jax.jit(jax.value_and_grad(loss))(params, x)
  mesh = make_mesh({"data": 8})
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    assert len(xs.sharding.device_set) == 8
    eight_loss, eight_grads = jax.jit(jax.value_and_grad(loss))(params, xs)
  np.testing.assert_allclose(eight_loss, one_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(eight_grads), jax.tree.leaves(one_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  micro = np.mean([float(loss(params, x[i:i + 1])) for i in range(8)])
  assert abs(micro - float(one_loss)) > 1e-3, (micro, float(one_loss))
