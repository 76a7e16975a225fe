"""MoH attention and MoT untied layers in training: AGD steps on imp_tiny (MoH in every
layer, or an untied layer 0; layer 1 is the MoE layer), the head metrics logged, checkpoints
resumed exactly, a data=2 x expert=4 mesh equal to one device; dropless dispatchers under
either."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe_jax.config import MoEConfig, TransformerConfig
from moe_jax.nn.context import Context
from moe_jax.nn.transformer import TransformerStack
from moe_jax.tasks import MODALITIES
from moe_jax.train import train_and_evaluate
from tests.train.test_train import imp_config

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


VARIANTS = {"moh": dict(attention=dict(name="moh")),  # --config.model.attention.name=moh:
            # 2 shared + top-1 of 2
            "untied": dict(untied_layers=(0,))}  # --config.model.untied_layers=(0,)


def _config(variant, num_steps=2, **mesh):
  c = imp_config(("image_cls",), num_steps=num_steps, log_every=1, eval_every=100,
                 checkpoint_every=1)
  del c.tasks.image_cls["eval_source"]  # no eval: two compiles per run (init, step)
  c.tasks.image_cls.batch_size = 16
  c.model.update(VARIANTS[variant])
  # Steps that move the weights; no weight decay, so unused weights stay exactly put.
  c.optimizer.update(warmup_steps=1, learning_rate=1e-2, weight_decay=0.0)
  c.mesh.update(mesh)
  return c


def _params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return jax.device_get(ocp.StandardCheckpointer().restore(path)["params"])


def _assert_close(got, want, **tol):
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, err_msg=jax.tree_util.keystr(path), **tol)


@needs_8
@pytest.mark.parametrize("variant", VARIANTS)
def test_agd_training_resume_and_mesh(tmp_path, variant):
  one, mesh, resumed = (str(tmp_path / n) for n in ("one", "mesh", "resumed"))
  s1 = train_and_evaluate(_config(variant), one)
  assert s1["compiles"] == {"image_cls": 1}
  logged = s1["train_history"][-1]
  p1, p2 = _params(one, 1), _params(one, 2)
  moved = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max())
  if variant == "moh":
    np.testing.assert_allclose(logged["train/image_cls/moe/active_head_fraction"], 3 / 4)
    assert logged["train/image_cls/moe/head_balance_loss"] > 0
    routers = lambda p: p["encoder"]["layers"]["block_0"]["attention"]["w_routed_DH"]
    assert moved(routers(p2), routers(p1)) > 0  # the head router learns
  else:  # image tokens train modality "image"'s weights and leave "text"'s exactly as they were
    w = lambda p, m: p["encoder"]["layers"]["block_0"][f"modality_{MODALITIES.index(m)}"][
        "w_qkv_D3HQ"]
    assert moved(w(p2, "image"), w(p1, "image")) > 0
    assert moved(w(p2, "text"), w(p1, "text")) == 0

  if variant == "untied":  # per-modality submodules; MoH's params are plain ones
    # Resume: one step, then the same command to two steps, equals two steps in one go.
    train_and_evaluate(_config(variant, num_steps=1), resumed)
    s_r = train_and_evaluate(_config(variant), resumed)
    assert s_r["resumed_from"] == 1
    _assert_close(_params(resumed, 2), p2, rtol=1e-6, atol=1e-7)

  sm = train_and_evaluate(_config(variant, data=2, expert=4), mesh)
  assert sm["mesh"] == {"data": 2, "fsdp": 1, "expert": 4, "model": 1}
  for step in (1, 2):
    _assert_close(_params(mesh, step), _params(one, step), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("variant", [dict(attention=dict(name="moh", shared_heads=1, k=2)),
                                     dict(untied_layers=(0,), num_modalities=2)],
                         ids=["moh", "untied"])
def test_dropless_dispatchers_under_moh_or_untied_layers(variant):
  """sorted and tiled compute the same dropless MoE: a stack with MoH (or an untied layer)
  and a top-2 MoE layer gives one output and one gradient through either."""
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  ctx = Context(modality_BS=jnp.array([[0, 1] * 3, [1, 1, 0, 0, 1, 1]], jnp.int32))
  outs = []
  for dispatch in ("sorted", "tiled"):
    moe = MoEConfig(num_experts=4, expert_hidden_dim=8, router=dict(name="top_k", k=2),
                    dispatch=dispatch)
    stack = TransformerStack(TransformerConfig(
        num_layers=2, d_model=16, num_heads=4, mlp_dim=24, moe=moe, moe_layers=(1,),
        **variant))
    params = stack.init(jax.random.key(1), x, context=ctx)["params"]
    loss = lambda p: jnp.sum(stack.apply({"params": p}, x, context=ctx) ** 2)
    outs.append(jax.value_and_grad(loss)(params))
  np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5)
  _assert_close(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-5)
