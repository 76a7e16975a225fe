"""Router steering: zero bias is the identity, a large bias forces the expert (also under
scan, in the chosen repeat only), bad layer / expert ids are one line."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import MoEConfig, TransformerConfig, TransformerStack
from moe_jax.analysis import layer_records
from moe_jax.analysis.steering import (moe_layers, most_used_experts, parse_steer,
                                       steering_variables)

MOE = MoEConfig(num_experts=4, router=dict(name="top_k", k=2), expert_hidden_dim=16,
                dispatch="sorted")
B, S, D = 2, 6, 16


def _stack(scan):
  cfg = TransformerConfig(num_layers=4, d_model=D, num_heads=2, mlp_dim=32, moe=MOE,
                          moe_every=2, scan_layers=scan)
  stack = TransformerStack(cfg)
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  return stack, stack.init(jax.random.key(1), x), x


def _run(stack, variables, x, steer=None):
  extra = steering_variables(variables["params"], steer or {})
  y, coll = stack.apply({**variables, **extra}, x, mutable=["routing"])
  return y, {name: rec for name, _, rec in layer_records(coll["routing"])}


@pytest.mark.parametrize("scan", [False, True])
def test_zero_bias_is_the_identity_and_a_large_bias_forces_the_expert(scan):
  stack, variables, x = _stack(scan)
  layers = moe_layers(variables["params"])
  names = [l["name"] for l in layers]
  assert names == (["scan_0/block_1/moe@0", "scan_0/block_1/moe@1"] if scan
                   else ["layers/block_1/moe", "layers/block_3/moe"])
  y0, recs0 = _run(stack, variables, x)
  y_zero, _ = _run(stack, variables, x, {0: {0: 0.0, 3: 0.0}, 1: {2: 0.0}})
  np.testing.assert_array_equal(y_zero, y0)
  assert not all((recs0[names[1]]["expert_index"] == 2).any(-1).ravel())  # not already so
  y, recs = _run(stack, variables, x, {1: {2: 1e4}})
  assert np.all((recs[names[1]]["expert_index"] == 2).any(-1))  # every token, layer 1
  np.testing.assert_array_equal(recs[names[0]]["expert_index"], recs0[names[0]]["expert_index"])
  assert not np.allclose(y, y0)


def test_bad_layer_and_expert_ids_are_one_line():
  _, variables, _ = _stack(False)
  params = variables["params"]
  with pytest.raises(ValueError, match=r"^steering layer 2 is out of range: the model has 2 MoE "
                                       r"layers \(0\.\.1: layers/block_1/moe, "
                                       r"layers/block_3/moe\)$"):
    steering_variables(params, {2: {0: 1.0}})
  with pytest.raises(ValueError, match=r"^steering expert 4 is out of range: layer 0 "
                                       r"\(layers/block_1/moe\) has 4 experts \(0\.\.3\)$"):
    steering_variables(params, {0: {4: 1.0}})
  with pytest.raises(ValueError, match=r"^--steer='1:x=2' must be LAYER:EXPERT=BIAS"):
    parse_steer(["1:x=2"])
  assert parse_steer(["1,2:0,3=2.5", "0:1=-1"]) == {1: {0: 2.5, 3: 2.5}, 2: {0: 2.5, 3: 2.5},
                                                   0: {1: -1.0}}


def test_most_used_experts_breaks_load_ties_by_router_probability():
  layer = {"groups": {
      "en": {"expert_load": [0.1, 0.4, 0.4, 0.1], "routing_distribution": [0.1, 0.3, 0.5, 0.1]},
      "ec": {"expert_load": [0.25] * 4, "routing_distribution": [0.2, 0.1, 0.3, 0.4]},
      "all": {"expert_load": [0.25] * 4, "routing_distribution": [0.25] * 4}}}
  assert most_used_experts(layer, "en", 2) == [2, 1]
  assert most_used_experts(layer, "ec", 1) == [3]
  with pytest.raises(ValueError, match=r"^group 'fr' is not in the analysis; groups: en, ec$"):
    most_used_experts(layer, "fr", 1)


def test_zeros_at_every_router_change_nothing():
  stack, variables, x = _stack(True)
  y0 = stack.apply(variables, x)
  zeros = steering_variables(variables["params"], {}, every_layer=True)
  assert zeros["steering"]["scan_0"]["block_1"]["moe"]["router"]["logit_bias_E"].shape == (2, 4)
  np.testing.assert_array_equal(stack.apply({**variables, **zeros}, x), y0)
