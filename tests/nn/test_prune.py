"""Dynamic pruning at inference (MoEConfig.prune_beta): a loop-over-experts reference,
beta=0 is the identity, training calls are untouched, bad values are one line."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import ExpertWeights, MoEConfig, MoELayer
from tests import reference

B, S, D, E = 2, 8, 8, 4


def _layer(dispatch, beta):
  return MoELayer(MoEConfig(num_experts=E, expert_hidden_dim=16, dispatch=dispatch,
                            router=dict(name="top_k", k=3), prune_beta=beta))


@pytest.mark.parametrize("dispatch", ["sorted", "tiled"])
def test_pruned_layer_equals_the_loop_reference_and_reports_the_skipped_share(dispatch):
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  layer = _layer(dispatch, 0.5)
  params = layer.init(jax.random.key(1), x)["params"]
  y, coll = layer.apply({"params": params}, x, mutable=["moe_metrics"])
  # Reference: softmax router, top 3 renormalised; slots under half the top weight skipped.
  x_TD = np.asarray(x).reshape(-1, D)
  logits = x_TD @ np.asarray(params["router"]["w_DE"])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  index = np.argsort(-probs, -1)[:, :3]
  w = np.take_along_axis(probs, index, -1)
  w /= w.sum(-1, keepdims=True)
  keep = w >= 0.5 * w.max(-1, keepdims=True)
  assert 0 < (~keep).sum() < keep.size  # the case prunes some slots, not all
  p = params["experts"]
  experts = ExpertWeights(p["w_up_EDF"], p["w_down_EFD"], p.get("w_gate_EDF"), "swiglu")
  want = reference.jnp_loop_moe(jnp.asarray(x_TD), jnp.asarray(index),
                                jnp.asarray(np.where(keep, w, 0.0)), jnp.asarray(keep), experts)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=1e-5, atol=1e-5)
  (metrics,) = coll["moe_metrics"]["moe"]
  np.testing.assert_allclose(metrics["pruned_slot_fraction"], (~keep).sum() / keep.size,
                             rtol=1e-6)
  # Training calls never prune: the same as the unpruned layer.
  y_train = layer.apply({"params": params}, x, deterministic=False)
  np.testing.assert_array_equal(y_train, _layer(dispatch, 0.0).apply({"params": params}, x,
                                                                     deterministic=False))


def test_beta_zero_is_the_identity_and_bad_betas_are_one_line():
  from moe_jax.nn.layers.moe import prune_slots
  from moe_jax.nn.routing import RoutingDecision
  decision = RoutingDecision(expert_index_TK=jnp.array([[0, 1], [2, 3]]),
                             weight_TK=jnp.array([[0.9, 0.1], [0.5, 0.0]]))
  kept, share = prune_slots(decision, 0.0, None)
  np.testing.assert_array_equal(kept.valid_TK(), np.ones((2, 2), bool))
  np.testing.assert_array_equal(kept.weight_TK, decision.weight_TK)
  assert float(share) == 0.0
  kept, share = prune_slots(decision, 0.2, jnp.array([True, False]))  # token 1: padding
  np.testing.assert_array_equal(kept.valid_TK(), [[True, False], [True, False]])
  assert float(share) == pytest.approx(0.5)  # 1 of token 0's 2 slots
  with pytest.raises(ValueError, match=r"^prune_beta=1.5 must be in \[0, 1\] \(0: no pruning\)$"):
    MoEConfig(prune_beta=1.5)
