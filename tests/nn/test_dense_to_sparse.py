"""EvoMoE's dense-to-sparse gate (arXiv:2112.14397): the hand-worked schedule, the
counter in router_state driving it from dense to top-1, the layer against a plain loop
(outputs and gradients), and the config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import MoEConfig, MoELayer
from moe_jax.nn.experts import ExpertWeights
from moe_jax.nn.routing import ROUTER_STATE
from moe_jax.nn.routing.dense_to_sparse import DenseToSparseRouter
from tests import reference

# tau(calls): 2.0, 1.5, 1.0, 0.5, then 0.5; hard top-1 from call 5 on.
ROUTER = DenseToSparseRouter(num_experts=4, tau_max=2.0, tau_min=0.5, anneal_steps=3,
                             threshold=0.15, switch_step=5)
Z = np.array([[2.0, 1.0, 0.0, -1.0]])  # one token's logits (w_DE = identity)


def _eval(calls):
  variables = {"params": {"w_DE": jnp.eye(4)}, ROUTER_STATE: {"calls": jnp.int32(calls)}}
  return ROUTER.apply(variables, jnp.asarray(Z, jnp.float32), deterministic=True)


@pytest.mark.parametrize("calls, tau, active, gates", [
    # tau 2: exp([1, .5, 0, -.5]) / 5.974 = [.455, .276, .167, .102] -> three above 0.15
    (0, 2.0, [1, 1, 1, 0], [0.4551, 0.2760, 0.1674, 0.1015]),
    # tau 1: exp([2, 1, 0, -1]) / 11.475 = [.644, .237, .087, .032] -> two
    (2, 1.0, [1, 1, 0, 0], [0.6439, 0.2369, 0.0871, 0.0321]),
    # tau 0.5: exp([4, 2, 0, -2]) / 63.12 = [.865, .117, .016, .002] -> one
    (3, 0.5, [1, 0, 0, 0], [0.8650, 0.1171, 0.0158, 0.0021]),
    # after the switch: top-1 whatever the threshold would keep (tau_min = 0.5)
    (7, 0.5, [1, 0, 0, 0], [0.8650, 0.1171, 0.0158, 0.0021]),
])
def test_hand_worked_schedule_threshold_and_switch(calls, tau, active, gates):
  d = _eval(calls)
  np.testing.assert_allclose(d.aux["temperature"], tau, rtol=1e-6)
  np.testing.assert_array_equal(d.mask_TK[0], np.array(active, bool))
  np.testing.assert_array_equal(d.expert_index_TK[0], [0, 1, 2, 3])
  np.testing.assert_allclose(d.weight_TK[0], np.where(active, gates, 0.0), atol=2e-4)
  np.testing.assert_allclose(d.aux["active_experts_per_token"], sum(active))


def test_switch_keeps_top1_even_when_the_threshold_would_keep_more():
  # tau 1 (calls=2) keeps two; the same tau after an early switch keeps one.
  early = DenseToSparseRouter(num_experts=4, tau_max=2.0, tau_min=0.5, anneal_steps=3,
                              threshold=0.15, switch_step=2)
  variables = {"params": {"w_DE": jnp.eye(4)}, ROUTER_STATE: {"calls": jnp.int32(2)}}
  d = early.apply(variables, jnp.asarray(Z, jnp.float32))
  np.testing.assert_array_equal(d.mask_TK[0], [1, 0, 0, 0])
  np.testing.assert_allclose(d.weight_TK[0, 0], 0.6439, atol=2e-4)


def test_training_calls_advance_the_counter_and_sparsify_to_top1():
  router = DenseToSparseRouter(num_experts=8, tau_max=3.0, tau_min=0.2, anneal_steps=6,
                               threshold=0.02, switch_step=8)
  x = jax.random.normal(jax.random.key(0), (64, 8))
  variables = router.init(jax.random.key(1), x)
  assert int(variables[ROUTER_STATE]["calls"]) == 0
  apply = jax.jit(lambda v, key: router.apply(v, x, deterministic=False,
                                              rngs={"jitter": key}, mutable=[ROUTER_STATE]))
  active, taus = [], []
  for call in range(10):
    d, state = apply(variables, jax.random.key(2))  # same noise: only tau moves
    variables = {**variables, **state}
    assert int(variables[ROUTER_STATE]["calls"]) == call + 1
    active.append(float(d.aux["active_experts_per_token"]))
    taus.append(float(d.aux["temperature"]))
  np.testing.assert_allclose(taus, [3.0 - 2.8 * min(c / 6, 1) for c in range(10)], rtol=1e-6)
  assert active[0] > 4  # dense at the start
  assert all(a >= b for a, b in zip(active, active[1:])), active
  assert active[7] > 1 and active[8:] == [1.0, 1.0], active
  # Evaluation reads the counter but never moves it, and draws no noise.
  d1, state = router.apply(variables, x, deterministic=True, mutable=[ROUTER_STATE])
  assert int(state[ROUTER_STATE]["calls"]) == 10
  d2 = router.apply(variables, x)
  np.testing.assert_array_equal(d1.weight_TK, d2.weight_TK)


def _np_dts_layer(x, params, tau, threshold):
  """float64: the noise-free gate softmax(x W / tau), experts at or above the threshold
  (and the argmax), each weighted by its gate; a plain loop over tokens and experts."""
  f64 = lambda a: np.asarray(a, np.float64)
  z = f64(x) @ f64(params["router"]["w_DE"]) / tau
  g = np.exp(z - z.max(-1, keepdims=True))
  g /= g.sum(-1, keepdims=True)
  ex = params["experts"]
  y, active = np.zeros_like(f64(x)), 0
  for t in range(x.shape[0]):
    for e in range(g.shape[1]):
      if g[t, e] >= threshold or e == np.argmax(g[t]):
        active += 1
        y[t] += g[t, e] * reference.np_ffn(f64(x[t:t + 1]), f64(ex["w_up_EDF"][e]),
                                           f64(ex["w_down_EFD"][e]), f64(ex["w_gate_EDF"][e]))[0]
  return y, active


@pytest.mark.parametrize("dispatch", ["sorted", "tiled", "einsum"])
def test_layer_equals_a_loop_over_the_kept_experts(dispatch):
  cfg = MoEConfig(num_experts=4, expert_hidden_dim=8, dispatch=dispatch,
                  router=dict(name="dense_to_sparse", tau_max=2.0, tau_min=0.5,
                              anneal_steps=3, threshold=0.2))
  layer = MoELayer(cfg)
  x = jax.random.normal(jax.random.key(0), (12, 8))
  variables = layer.init(jax.random.key(1), x)
  variables[ROUTER_STATE]["router"]["calls"] = jnp.int32(1)  # tau = 1.5
  y, coll = layer.apply(variables, x, mutable=["moe_metrics"])
  want, active = _np_dts_layer(np.asarray(x), variables["params"], 1.5, 0.2)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  assert 12 < active < 48  # some experts dropped, some tokens with several
  np.testing.assert_allclose(coll["moe_metrics"]["moe"][0]["active_experts_per_token"],
                             active / 12, rtol=1e-6)


def test_gradients_equal_a_differentiable_reference():
  cfg = MoEConfig(num_experts=4, expert_hidden_dim=8, dispatch="sorted",
                  router=dict(name="dense_to_sparse", tau_max=3.0, tau_min=1.5,
                              anneal_steps=0, threshold=0.2, switch_step=10))
  layer = MoELayer(cfg)
  x = jax.random.normal(jax.random.key(3), (12, 8))
  variables = layer.init(jax.random.key(4), x)
  state = variables[ROUTER_STATE]
  cot = jax.random.normal(jax.random.key(5), x.shape)

  def ref(params, x):  # the gate written out, then a loop over experts
    g = jax.nn.softmax(x @ params["router"]["w_DE"] / 1.5, axis=-1)
    keep = (g >= 0.2) | jax.nn.one_hot(jnp.argmax(g, -1), 4, dtype=bool)
    index = jnp.broadcast_to(jnp.arange(4), g.shape)
    return jnp.sum(reference.jnp_loop_moe(x, index, g, keep,
                                          ExpertWeights(**params["experts"])) * cot)

  def got(params, x):
    return jnp.sum(layer.apply({"params": params, ROUTER_STATE: state}, x) * cot)

  g_ref = jax.grad(ref, argnums=(0, 1))(variables["params"], x)
  g_got = jax.grad(got, argnums=(0, 1))(variables["params"], x)
  assert float(jnp.abs(g_got[0]["router"]["w_DE"]).max()) > 1e-4  # the gate learns
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_got)[0], jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("options, message", [
    (dict(tau_max=0.5, tau_min=1.0), r"tau_min=1.0 must be <= tau_max=0.5"),
    (dict(anneal_steps=-1), r"anneal_steps=-1 is out of range; allowed: 0 <= anneal_steps"),
    (dict(threshold=1.0), r"threshold=1.0 must be a number in \[0, 1\)"),
    (dict(threshold=-0.1), r"threshold=-0.1 must be a number in \[0, 1\)"),
    (dict(switch_step=-2), r"switch_step=-2 is out of range"),
])
def test_bad_settings_are_one_line_errors(options, message):
  with pytest.raises(ValueError, match=message):
    MoEConfig(num_experts=4, router=dict(name="dense_to_sparse", **options))


def test_training_without_rng_or_state_is_a_one_line_error():
  x = jnp.ones((2, 4))
  params = {"params": {"w_DE": jnp.eye(4)}}
  with pytest.raises(ValueError, match=r"keeps its schedule counter in the 'router_state'"):
    ROUTER.apply(params, x)
  with pytest.raises(ValueError, match=r"draws its Gumbel noise from the 'jitter' rng"):
    ROUTER.apply({**params, ROUTER_STATE: {"calls": jnp.int32(0)}}, x, deterministic=False)
