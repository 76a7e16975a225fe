"""The layer variants (Soft MoE, residual, pyramid) under AGD training: one train step
each, and train_and_evaluate on a data=2 x expert=4 mesh, resumed from a checkpoint,
equal to one uninterrupted device."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe_jax import models
from moe_jax.train import train_and_evaluate
from moe_jax.train.agd import Task
from moe_jax.train.step import TrainState, make_optimizer, make_train_step
from tests.train.test_train import imp_config

BASE = dict(name="imp", d_model=16, num_layers=2, num_heads=2, mlp_dim=32, moe_last=1,
            patch_image=(2, 2), embed_dim=8)
MOE = dict(num_experts=4, expert_hidden_dim=16, router=dict(name="top_k", k=2),
           load_balance_weight=0.01, z_loss_weight=0.001)
VARIANTS = {
    "soft_moe": dict(moe=dict(MOE, layer=dict(name="soft_moe", slots_per_expert=2))),
    "residual_tiled": dict(moe=dict(MOE, dispatch="tiled", layer="residual")),
    "pyramid_scan_sorted": dict(moe=dict(MOE, dispatch="sorted"), moe_last=2,
                                moe_num_experts=(2, 4), scan_layers=True),
}


def _moe_params(params, name):
  """The parameters at each MoE position (a block's "moe"), whatever the stack's layout."""
  found = []
  def visit(node):
    for k, v in node.items() if isinstance(node, dict) else ():
      if k.startswith("block_") and "moe" in v:
        found.append(v["moe"])
      else:
        visit(v)
  visit(params["encoder"])
  assert found, name
  return found


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_agd_train_step_in_the_imp_encoder(variant):
  model = models.build_model(dict(BASE, **VARIANTS[variant]))
  task = Task("img", "classify", "x", modalities=("image",), num_classes=10, batch_size=4)
  batch = {"image": jax.random.uniform(jax.random.key(0), (4, 8, 8, 1)),
           "label": jnp.arange(4)}
  params = model.init(jax.random.key(1), batch, task=task)["params"]
  loss0, _ = model.apply({"params": params}, batch, task=task)  # one forward
  assert np.isfinite(float(loss0))
  tx = make_optimizer(dict(learning_rate=1e-2, warmup_steps=0, weight_decay=0.0,
                           grad_clip_norm=1.0), 10)
  train_step, _ = make_train_step(model, tx)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(2))
  new, metrics = jax.jit(train_step, static_argnums=2)(state, batch, task)
  assert np.isfinite(float(metrics["total_loss"]))
  if variant == "soft_moe":  # no balance loss: nothing is added to the task loss
    assert float(metrics["aux_loss"]) == 0.0
    np.testing.assert_allclose(metrics["total_loss"], metrics["loss"], rtol=1e-6)
    assert {"moe/combine_weight_max", "moe/dispatch_weight_max"} <= set(metrics)
  else:
    assert float(metrics["aux_loss"]) > 0 and "moe/load_balance_loss" in metrics
  # Every parameter of every MoE position moved (each gets gradient).
  for old, upd in zip(_moe_params(params, variant), _moe_params(new.params, variant)):
    for path, a in jax.tree_util.tree_flatten_with_path(old)[0]:
      b = upd
      for k in path:
        b = b[k.key]
      assert float(jnp.abs(a - b).max()) > 0, (variant, jax.tree_util.keystr(path))


def _run_config(model_overrides, **mesh):
  c = imp_config(("image_cls",), num_steps=2, log_every=1, eval_every=100, checkpoint_every=1)
  del c.tasks.image_cls["eval_source"]  # no eval: two compiles per run (init, step)
  c.tasks.image_cls.batch_size = 16
  c.model.update({k: v for k, v in model_overrides.items() if k != "moe"})
  for k, v in model_overrides.get("moe", {}).items():  # replaced whole (router, layer)
    del c.model.moe[k]
    c.model.moe[k] = v
  c.mesh.update(mesh)
  return c


def _params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return jax.device_get(ocp.StandardCheckpointer().restore(path)["params"])


PR_MOE = dict(moe=dict(layer="residual", dispatch="sorted", router=dict(name="top_k", k=2)),
              moe_last=2, moe_num_experts=(4, 8), scan_layers=True)  # DeepSpeed's PR-MoE
SOFT = dict(moe=dict(layer=dict(name="soft_moe", slots_per_expert=2)))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("overrides", [SOFT, PR_MOE], ids=["soft_moe", "pr_moe"])
def test_resumed_mesh_training_equals_one_device(tmp_path, overrides):
  one, mesh = str(tmp_path / "one"), str(tmp_path / "mesh")
  train_and_evaluate(_run_config(overrides), one)
  c = _run_config(overrides, data=2, expert=4)
  c.train.num_steps = 1
  train_and_evaluate(c, mesh)
  c.train.num_steps = 2
  sm = train_and_evaluate(c, mesh)  # resumes from the step-1 checkpoint
  assert sm["resumed_from"] == 1 and sm["final_step"] == 2
  assert sm["mesh"] == {"data": 2, "fsdp": 1, "expert": 4, "model": 1}
  p1, pm = _params(one, 2), _params(mesh, 2)
  assert jax.tree.structure(p1) == jax.tree.structure(pm)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(pm)[0], jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_a_mesh_that_does_not_divide_a_pyramid_layer_fails_naming_it(tmp_path):
  c = _run_config(dict(moe_last=2, moe_num_experts=(4, 6)), data=2, expert=4)
  with pytest.raises(ValueError, match=r"^model.moe_num_experts\[1\]=6 \(layer 1\) is not "
                                       r"divisible by mesh.expert=4$"):
    train_and_evaluate(c, str(tmp_path))
