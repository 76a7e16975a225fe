"""Aux-loss-free balancing bias (DeepSeek-V3) in the router_state collection: hand-worked
updates, selection-only use, the train step carrying it, and checkpoints saving it."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax import models
from moe_jax.nn.routing import ROUTER_STATE, TopKRouter
from moe_jax.tasks import Task
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.step import TrainState, make_train_step

# k=1 picks: t0 -> e0, t1 -> e0, t2 -> e1, t3 -> e2: loads [2, 1, 1, 0], mean 1.
P = np.array([[0.4, 0.3, 0.2, 0.1],
              [0.5, 0.2, 0.2, 0.1],
              [0.1, 0.6, 0.2, 0.1],
              [0.2, 0.1, 0.6, 0.1]])
ROUTER = TopKRouter(num_experts=4, k=1, bias_update_rate=0.1)


def _apply(bias, **kw):
  variables = {"params": {"w_DE": jnp.eye(4)}, ROUTER_STATE: {"bias_E": jnp.asarray(bias)}}
  return ROUTER.apply(variables, jnp.asarray(np.log(P), jnp.float32), **kw)


def test_bias_moves_by_rate_against_the_load_sign():
  d, state = _apply([0.0] * 4, deterministic=False, mutable=[ROUTER_STATE])
  np.testing.assert_array_equal(d.expert_index_TK[:, 0], [0, 0, 1, 2])
  # b += 0.1 * sign(mean load 1 - load [2, 1, 1, 0]) = [-0.1, 0, 0, +0.1]
  np.testing.assert_allclose(state[ROUTER_STATE]["bias_E"], [-0.1, 0, 0, 0.1], rtol=1e-6)


def test_bias_chooses_experts_but_never_weights_them():
  # bias e3 += 0.35: t0 scores+bias [0.4, 0.3, 0.2, 0.45] -> e3, gated by its score 0.1;
  # t1 [0.5, ..., 0.45] keeps e0 (0.5); t3's 0.6 still beats 0.45.
  d = _apply([0.0, 0.0, 0.0, 0.35])
  np.testing.assert_array_equal(d.expert_index_TK[:, 0], [3, 0, 1, 2])
  np.testing.assert_allclose(d.weight_TK[:, 0], [0.1, 0.5, 0.6, 0.6], rtol=1e-5)


def test_eval_and_immutable_calls_read_the_bias_without_moving_it():
  _, state = _apply([0.0] * 4, deterministic=True, mutable=[ROUTER_STATE])
  np.testing.assert_array_equal(state[ROUTER_STATE]["bias_E"], [0.0] * 4)
  with pytest.raises(ValueError, match="keeps its bias in the 'router_state' collection"):
    ROUTER.apply({"params": {"w_DE": jnp.eye(4)}}, jnp.ones((4, 4)))


def _lm_state():
  moe = dict(num_experts=4, expert_hidden_dim=8, dispatch="sorted",
             router=dict(name="top_k", k=2, score="sigmoid", bias_update_rate=0.01))
  model = models.build_model(dict(name="lm", d_model=8, num_layers=2, num_heads=2, mlp_dim=16,
                                  causal=True, moe_every=1, moe=moe))
  task = Task("lm", "lm", "x", modalities=("tokens",))
  batch = {"tokens": jax.random.randint(jax.random.key(0), (2, 9), 1, 257)}
  variables = model.init(jax.random.key(1), batch, task=task)
  tx = optax.sgd(0.1)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                     opt_state=tx.init(variables["params"]), rng=jax.random.PRNGKey(2),
                     router_state=variables[ROUTER_STATE])
  return model, tx, task, batch, state


def test_train_step_carries_the_bias_outside_the_optimizer(tmp_path):
  model, tx, task, batch, state = _lm_state()
  biases = jax.tree.leaves(state.router_state)
  assert len(biases) == 2 and all(float(jnp.abs(b).max()) == 0 for b in biases)
  train_step, _ = make_train_step(model, tx)
  new, _ = jax.jit(train_step, static_argnums=2)(state, batch, task)
  for b in jax.tree.leaves(new.router_state):
    steps = np.asarray(b) / 0.01  # each entry moved by -1, 0 or +1 times the rate
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-5)
    assert np.abs(steps).max() == 1 and set(np.round(steps).tolist()) <= {-1.0, 0.0, 1.0}
  assert "bias_E" not in str(jax.tree_util.tree_structure(new.params))  # not a parameter
  # Saved and restored with the rest of the train state.
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, new, {"lm": {"position": 1}})
  restored, data = ckpt.restore(1, new)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(new.router_state), jax.tree.leaves(restored.router_state)):
    np.testing.assert_array_equal(a, b)
  assert data == {"lm": {"position": 1}}
