"""MoELayer end to end against a reference layer written from scratch in the test."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import ExpertWeights, FeedForward, MoEConfig, MoELayer, sum_aux_losses
from tests import reference

B, S, D = 2, 8, 8  # T = 16 tokens


def reference_layer(params, x_BSD, cfg: MoEConfig):
  """Router + loop over experts, re-derived: softmax/top-k or per-expert thresholds."""
  x = x_BSD.reshape(-1, D)
  probs = jax.nn.softmax(x.astype(jnp.float32) @ params["router"]["w_DE"], axis=-1)
  if cfg.router.name == "top_k":
    k = cfg.router.get("k")
    weight, index = jax.lax.top_k(probs, k)
    if k > 1:  # a single slot is gated by its probability (Switch), never renormalised
      weight = weight / weight.sum(-1, keepdims=True)
    keep = jnp.ones(index.shape, bool)
  else:  # expert choice, one group: expert e keeps tokens scoring >= its C-th best
    C = int(round(cfg.capacity_factor * x.shape[0] / cfg.num_experts))
    kth_best_E = jnp.sort(probs, axis=0)[-C]
    keep = probs >= kth_best_E[None, :]
    index = jnp.broadcast_to(jnp.arange(cfg.num_experts), probs.shape)
    weight = probs
  p = params["experts"]
  experts = ExpertWeights(p["w_up_EDF"], p["w_down_EFD"], p.get("w_gate_EDF"), cfg.activation)
  y = reference.jnp_loop_moe(x, index, weight, keep, experts)
  if cfg.num_shared_experts:
    y = y + FeedForward(cfg.expert_hidden_dim * cfg.num_shared_experts, cfg.activation).apply(
        {"params": params["shared_experts"]}, x)
  return y.reshape(x_BSD.shape)


CASES = [
    dict(router=dict(name="top_k", k=2)),
    dict(router=dict(name="top_k", k=1), activation="gelu"),
    dict(router=dict(name="top_k", k=2), num_shared_experts=1),
    dict(router="expert_choice", capacity_factor=1.0),
]


@pytest.mark.parametrize("dispatch", ["einsum", "sorted", "dense"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_layer_matches_reference_outputs_and_gradients(case, dispatch):
  cfg = MoEConfig(num_experts=4, expert_hidden_dim=16, dispatch=dispatch, **{
      "capacity_factor": 4.0, **case})  # roomy capacity for top_k + einsum
  layer = MoELayer(cfg)
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  params = layer.init(jax.random.key(1), x)["params"]
  cot = jax.random.normal(jax.random.key(2), (B, S, D))

  ours = lambda p, x: jnp.sum(layer.apply({"params": p}, x) * cot)
  ref = lambda p, x: jnp.sum(reference_layer(p, x, cfg) * cot)
  np.testing.assert_allclose(layer.apply({"params": params}, x), reference_layer(params, x, cfg),
                             rtol=1e-5, atol=1e-5)
  g_ours = jax.grad(ours, argnums=(0, 1))(params, x)
  g_ref = jax.grad(ref, argnums=(0, 1))(params, x)
  assert jax.tree.structure(g_ours) == jax.tree.structure(g_ref)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Router and every expert receive gradient.
  assert float(jnp.abs(g_ours[0]["router"]["w_DE"]).sum()) > 0


def test_layer_sows_weighted_aux_loss_and_metrics():
  cfg = MoEConfig(num_experts=4, router=dict(name="top_k", k=2), expert_hidden_dim=16,
                  load_balance_weight=0.5, z_loss_weight=0.25)
  layer = MoELayer(cfg)
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  params = layer.init(jax.random.key(1), x)["params"]
  _, state = layer.apply({"params": params}, x, mutable=["aux_loss", "moe_metrics"])
  (metrics,) = state["moe_metrics"]["moe"]
  assert set(metrics) == {"load_balance_loss", "z_loss", "expert_load_E", "processed_load_E",
                          "dropped_slot_fraction", "unrouted_token_fraction", "router_entropy"}
  want = 0.5 * metrics["load_balance_loss"] + 0.25 * metrics["z_loss"]
  np.testing.assert_allclose(sum_aux_losses(state), want, rtol=1e-6)
  assert float(want) > 0
  np.testing.assert_allclose(metrics["expert_load_E"].sum(), 1.0, rtol=1e-6)
  # init()'s whole output passed back: it holds parameters only, so counted once.
  variables = layer.init(jax.random.key(1), x)
  assert set(variables) == {"params"}
  _, again = layer.apply(variables, x, mutable=["aux_loss", "moe_metrics"])
  np.testing.assert_allclose(sum_aux_losses(again), want, rtol=1e-6)


def test_layer_reports_einsum_drops():
  # capacity_factor 0.25 with 16 tokens, E=4, k=2: C = ceil(0.25*16*2/4) = 2 of 8 wanted.
  cfg = MoEConfig(num_experts=4, router=dict(name="top_k", k=2), expert_hidden_dim=16,
                  dispatch="einsum", capacity_factor=0.25, eval_capacity_factor=4.0)
  layer = MoELayer(cfg)
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  params = layer.init(jax.random.key(1), x)["params"]
  dropped = lambda det: float(layer.apply({"params": params}, x, deterministic=det,
                                          mutable=["moe_metrics"])[1]["moe_metrics"]["moe"][0]
                              ["dropped_slot_fraction"])
  assert dropped(False) >= 1 - 4 * 2 / 32  # at most 4 experts x 2 slots kept of 32
  assert dropped(True) == 0.0  # eval capacity factor is roomy


def test_bf16_layer_is_close_to_f32():
  cfg = MoEConfig(num_experts=4, router=dict(name="top_k", k=2), expert_hidden_dim=16)
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  params = MoELayer(cfg).init(jax.random.key(1), x)["params"]
  y32 = MoELayer(cfg).apply({"params": params}, x)
  y16 = MoELayer(cfg, dtype=jnp.bfloat16).apply({"params": params}, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=2e-2, atol=2e-2)


def test_layer_rejects_input_with_other_model_dim():
  layer = MoELayer(MoEConfig(num_experts=4, router=dict(name="top_k", k=2), expert_hidden_dim=16))
  params = layer.init(jax.random.key(1), jnp.ones((B, S, D)))
  with pytest.raises(ValueError, match="D=6 but the expert weights were built for D=8"):
    layer.apply(params, jnp.ones((B, S, 6)))


def test_a_layer_called_twice_in_one_apply_sows_both_aux_losses():
  """IMP runs one shared encoder per modality: each call's aux loss must count."""
  cfg = MoEConfig(num_experts=4, router=dict(name="top_k", k=2), expert_hidden_dim=16,
                  load_balance_weight=0.5, z_loss_weight=0.25)

  class Twice(nn.Module):
    @nn.compact
    def __call__(self, a, b):
      layer = MoELayer(cfg)
      return layer(a), layer(b)

  a = jax.random.normal(jax.random.key(0), (B, S, D))
  b = 3.0 * jax.random.normal(jax.random.key(1), (B, S, D))
  params = Twice().init(jax.random.key(2), a, b)["params"]
  _, state = Twice().apply({"params": params}, a, b, mutable=["aux_loss"])
  single = lambda x: sum_aux_losses(MoELayer(cfg).apply(
      {"params": params["MoELayer_0"]}, x, mutable=["aux_loss"])[1])
  assert len(state["aux_loss"]["MoELayer_0"]["moe"]) == 2
  np.testing.assert_allclose(sum_aux_losses(state), single(a) + single(b), rtol=1e-6)


def test_drop_metrics_by_hand():
  from moe_jax import RoutingDecision
  from moe_jax.nn.layers.moe import drop_metrics
  d = RoutingDecision(expert_index_TK=jnp.array([[0, 1], [0, 1], [0, 2], [1, 2]]),
                      weight_TK=jnp.ones((4, 2)))
  kept = jnp.array([[1, 1], [1, 0], [0, 0], [1, 1]], bool)
  m = drop_metrics(d, kept, 3, None)
  np.testing.assert_allclose(m["dropped_slot_fraction"], 3 / 8)   # 3 of 8 chosen slots
  np.testing.assert_allclose(m["unrouted_token_fraction"], 1 / 4)  # token 2 got nothing
  # ran: e0 <- t0, t1; e1 <- t0, t3; e2 <- t3: [2, 2, 1] / 5
  np.testing.assert_allclose(m["processed_load_E"], [0.4, 0.4, 0.2], rtol=1e-6)
  real = jnp.array([1, 1, 0, 1])  # token 2 is padding: no real token is unrouted
  np.testing.assert_allclose(drop_metrics(d, kept, 3, real)["unrouted_token_fraction"], 0.0)
