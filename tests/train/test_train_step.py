"""The train step against independent references: microbatch accumulation and AdamW.

The resume, mesh and scan tests compare library paths with each other; these pin
what those paths share (the gradient step and the optimizer) to hand-written math.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax import models
from moe_jax.train.agd import Task
from moe_jax.train.step import TrainState, make_optimizer, make_train_step

# Dropless top-k routing and no load-balance loss: every term of the loss is a mean
# over examples or tokens, so two equal halves average to the whole batch exactly.
MODEL = dict(name="imp", d_model=16, num_layers=2, num_heads=2, mlp_dim=32, moe_last=1,
             moe=dict(num_experts=4, router=dict(name="top_k", k=2), dispatch="sorted",
                      expert_hidden_dim=16, load_balance_weight=0.0, z_loss_weight=0.01),
             patch_image=(2, 2), embed_dim=8)


def _sgd_step(microbatches):
  """One step with SGD(lr=1): the parameter change is minus the gradient."""
  model = models.build_model(MODEL)
  task = Task("img", "classify", "x", modalities=("image",), num_classes=10, batch_size=8,
              microbatches=microbatches)
  batch = {"image": jax.random.uniform(jax.random.key(0), (8, 8, 8, 1)),
           "label": jnp.arange(8) % 10}
  params = model.init(jax.random.key(1), batch, task=task)["params"]
  tx = optax.sgd(1.0)
  train_step, _ = make_train_step(model, tx)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(2))
  new, metrics = jax.jit(train_step, static_argnums=2)(state, batch, task)
  return metrics, jax.tree.map(lambda a, b: a - b, params, new.params)


def test_two_microbatches_give_the_whole_batch_loss_and_gradients():
  m1, g1 = _sgd_step(1)
  m2, g2 = _sgd_step(2)
  for key in ("loss", "total_loss", "aux_loss", "grad_norm"):
    np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=key)
  leaves1, leaves2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
  assert len(leaves1) == len(leaves2) > 10
  for a, b in zip(leaves1, leaves2):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  # grad_norm is the norm of the gradient actually applied.
  norm = np.sqrt(sum(float(jnp.sum(jnp.square(g))) for g in leaves1))
  np.testing.assert_allclose(m1["grad_norm"], norm, rtol=1e-5)


def _np_adamw(params, grads, cfg, num_steps, steps):
  """AdamW (decoupled decay on matrices only) after global-norm clipping, with
  linear warmup from 0 and cosine decay to end_lr_factor * lr; numpy float64."""
  lr, w = cfg["learning_rate"], cfg["warmup_steps"]
  end = lr * cfg["end_lr_factor"]
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v2 = {k: np.zeros_like(v) for k, v in params.items()}
  p = {k: v.copy() for k, v in params.items()}
  b1, b2, eps = 0.9, 0.999, 1e-8
  for t in range(steps):
    g = grads[t]
    norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
    scale = min(1.0, cfg["grad_clip_norm"] / norm)
    if t < w:
      lr_t = lr * t / w
    else:
      frac = (t - w) / (num_steps - w)
      lr_t = end + (lr - end) * 0.5 * (1 + np.cos(np.pi * frac))
    for k in p:
      gk = g[k] * scale
      m[k] = b1 * m[k] + (1 - b1) * gk
      v2[k] = b2 * v2[k] + (1 - b2) * gk**2
      mhat, vhat = m[k] / (1 - b1**(t + 1)), v2[k] / (1 - b2**(t + 1))
      decay = cfg["weight_decay"] * p[k] if p[k].ndim >= 2 else 0.0
      p[k] = p[k] - lr_t * (mhat / (np.sqrt(vhat) + eps) + decay)
  return p


def test_optimizer_is_clipped_adamw_with_warmup_and_cosine_decay():
  cfg = dict(learning_rate=0.1, warmup_steps=2, weight_decay=0.5, grad_clip_norm=1.0,
             end_lr_factor=0.1)
  num_steps, steps = 6, 5
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,))}
  # Large gradients (clipped) at some steps, small ones (not clipped) at others.
  grads = [{k: rng.normal(size=v.shape) * (3.0 if t % 2 else 0.1) for k, v in params.items()}
           for t in range(steps)]
  tx = make_optimizer(cfg, num_steps)
  p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  state = tx.init(p)
  for t in range(steps):
    updates, state = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in grads[t].items()},
                               state, p)
    p = optax.apply_updates(p, updates)
  want = _np_adamw(params, grads, cfg, num_steps, steps)
  for k in params:
    np.testing.assert_allclose(p[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert not np.allclose(want["w"], params["w"])  # the steps did move the parameters


class _SqrtAtZero(nn.Module):
  """Loss sqrt(|w|) summed, w initialised to 0: finite loss, non-finite gradient."""

  @nn.compact
  def __call__(self, batch, *, task, deterministic=True, zero_shot=False):
    w = self.param("w", nn.initializers.zeros, (3,))
    v = self.param("v", nn.initializers.ones, (2,))
    loss = jnp.sum(jnp.sqrt(jnp.abs(w))) + jnp.sum(v**2) * batch["x"].mean()
    return loss, {"loss": loss}


@pytest.mark.parametrize("policy", ["abort", "skip_step"])
def test_a_non_finite_gradient_with_a_finite_loss_is_flagged_by_group(policy):
  from moe_jax.train.trainer import nonfinite_report
  model, task = _SqrtAtZero(), Task("t", "classify", "x", num_classes=2)
  tx = optax.sgd(0.1)
  batch = {"x": jnp.ones((2,))}
  params = model.init(jax.random.key(0), batch, task=task)["params"]
  state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(0)))
  train_step, _ = make_train_step(model, tx, nonfinite=policy)
  new, metrics = jax.jit(train_step, static_argnames="task")(state, batch, task=task)
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  assert np.isfinite(metrics["loss"]) and not np.isfinite(metrics["grad_norm"])
  assert metrics["grad_finite/w"] == 0.0 and metrics["grad_finite/v"] == 1.0
  assert nonfinite_report(metrics).endswith("first non-finite gradient group: w (of 1)")
  if policy == "skip_step":  # nothing moves, not even the finite group
    assert metrics["skipped_step"] == 1.0
    np.testing.assert_array_equal(new.params["v"], params["v"])
    np.testing.assert_array_equal(new.params["w"], params["w"])
  else:  # the update is applied; the trainer stops before it is saved
    assert not np.all(np.isfinite(new.params["w"]))
  assert int(new.step) == 1
