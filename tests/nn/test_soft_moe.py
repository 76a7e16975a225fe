"""Soft MoE (arXiv:2308.00951) against a per-sequence reference written from the paper."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import MoEConfig, TransformerConfig, sum_aux_losses
from moe_jax.nn.layers import make_moe_layer
from moe_jax.parallel.sharding import make_mesh

B, S, D, E, C, F = 2, 6, 8, 4, 2, 16
MASK = np.ones((B, S), bool)
MASK[1, 4:] = False  # the second sequence ends with two padding tokens


def _layer(**options):
  cfg = MoEConfig(num_experts=E, expert_hidden_dim=F,
                  layer=dict(name="soft_moe", slots_per_expert=C, **options))
  return make_moe_layer(cfg, jnp.float32, jnp.float32)


def _unit(v, axis):
  return v / jnp.sqrt(jnp.sum(v * v, axis=axis, keepdims=True) + 1e-6)


def reference(p, x, mask):
  """Algorithm 1 one sequence at a time, with Section 2.3's normalisation; SwiGLU experts
  written out per expert."""
  phi = _unit(p["slots_DEC"], 0).reshape(D, E * C) * p["slots_scale"]
  ex = p["experts"]
  rows = []
  for b in range(B):
    logits = _unit(x[b], 1) @ phi  # [S, E*C]
    masked = jnp.where(mask[b][:, None], logits, -jnp.inf)
    dispatch = jnp.exp(masked - masked.max(0, keepdims=True))
    dispatch = dispatch / dispatch.sum(0, keepdims=True)
    combine = jnp.exp(logits - logits.max(1, keepdims=True))
    combine = combine / combine.sum(1, keepdims=True)
    slots = dispatch.T @ x[b]  # [E*C, D]: each slot a convex mix of the real tokens
    outs = []
    for e in range(E):
      s = slots[e * C:(e + 1) * C]
      outs.append((jax.nn.silu(s @ ex["w_gate_EDF"][e]) * (s @ ex["w_up_EDF"][e]))
                  @ ex["w_down_EFD"][e])
    rows.append((combine @ jnp.concatenate(outs)) * mask[b][:, None])
  return jnp.stack(rows)


@pytest.fixture(scope="module")
def setup():
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  layer = _layer()
  params = layer.init(jax.random.key(1), x, token_mask=MASK)["params"]
  # Not the init values: a scale != 1 and distinct slots, so the normalisation matters.
  params = {**params, "slots_scale": jnp.asarray(2.5),
            "slots_DEC": params["slots_DEC"] * jnp.arange(1.0, E * C + 1).reshape(1, E, C)}
  return layer, params, x


def test_matches_reference_outputs_and_gradients(setup):
  layer, params, x = setup
  mask = jnp.asarray(MASK)
  cot = jax.random.normal(jax.random.key(2), x.shape)
  ours = lambda p, x: layer.apply({"params": p}, x, token_mask=mask)
  np.testing.assert_allclose(ours(params, x), reference(params, x, mask), rtol=1e-5, atol=1e-5)
  g_ours = jax.grad(lambda p, x: jnp.sum(ours(p, x) * cot), argnums=(0, 1))(params, x)
  g_ref = jax.grad(lambda p, x: jnp.sum(reference(p, x, mask) * cot), argnums=(0, 1))(params, x)
  assert jax.tree.structure(g_ours) == jax.tree.structure(g_ref)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_ours)[0], jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(g_ours[0]["slots_scale"])) > 0  # the learned scale trains


def test_weights_are_convex_and_padding_gets_no_dispatch_weight(setup):
  layer, params, x = setup
  y, state = layer.apply({"params": params}, x, token_mask=MASK, mutable=["intermediates"])
  (dispatch,), (combine,) = (state["intermediates"][k] for k in ("dispatch_BSEC", "combine_BSEC"))
  assert dispatch.shape == combine.shape == (B, S, E, C)
  # Each token's output is a convex combination of the slot outputs...
  assert float(combine.min()) >= 0
  np.testing.assert_allclose(combine.sum((2, 3)), np.ones((B, S)), atol=1e-6)
  # ... and each slot a convex combination of its sequence's real tokens only.
  assert float(dispatch.min()) >= 0
  np.testing.assert_allclose(dispatch.sum(1), np.ones((B, E, C)), atol=1e-6)
  assert np.all(np.asarray(dispatch)[1, 4:] == 0)
  # So padding's values cannot reach a real token, and padding comes out 0.
  x2 = x.at[1, 4:].set(100.0)
  y2 = layer.apply({"params": params}, x2, token_mask=MASK)
  np.testing.assert_array_equal(np.asarray(y2)[MASK], np.asarray(y)[MASK])
  assert np.all(np.asarray(y2)[~MASK] == 0)
  # Sequences are separate groups: changing sequence 0 leaves sequence 1 as it was.
  y3 = layer.apply({"params": params}, x.at[0].multiply(-1.0), token_mask=MASK)
  np.testing.assert_array_equal(y3[1], y[1])


def test_an_all_padding_sequence_stays_finite(setup):
  """Eval fills a batch with all-padding examples: no NaN reaches the real ones."""
  layer, params, x = setup
  mask = jnp.asarray(MASK).at[1].set(False)
  loss = lambda p, x: jnp.sum(layer.apply({"params": p}, x, token_mask=mask) ** 2)
  y = layer.apply({"params": params}, x, token_mask=mask)
  assert np.all(np.asarray(y[1]) == 0) and np.all(np.isfinite(y))
  grads = jax.grad(loss, argnums=(0, 1))(params, x)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(y[0], reference(params, x, mask.at[1].set(True))[0], rtol=1e-5,
                             atol=1e-5)


def test_no_aux_loss_and_metrics_are_not_summed_as_one():
  """Soft MoE sows metrics but no aux loss: the sum of aux losses is 0, not the metrics."""
  layer = _layer()
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  params = layer.init(jax.random.key(1), x)["params"]
  _, coll = layer.apply({"params": params}, x, mutable=["aux_loss", "moe_metrics"])
  assert "aux_loss" not in coll
  (metrics,) = coll["moe_metrics"]["moe"]
  assert set(metrics) == {"combine_weight_max", "dispatch_weight_max"}
  assert 1.0 / (E * C) <= float(metrics["combine_weight_max"]) <= 1.0
  assert float(sum_aux_losses(coll)) == 0.0


@pytest.mark.parametrize("layer, message", [
    (dict(name="soft_moe", slots_per_expert=0), r"^layer.slots_per_expert=0 is out of range"),
    (dict(name="soft_moe", normalize=1), r"^layer.normalize=1 must be True or False$"),
    (dict(name="soft_moe", capacity=2), r"^unknown option\(s\) \['capacity'\] for layer "
                                        r"'soft_moe'; valid: slots_per_expert, normalize$"),
])
def test_bad_options_fail_at_config_build(layer, message):
  with pytest.raises(ValueError, match=message):
    MoEConfig(layer=layer)


def test_a_causal_stack_rejects_soft_moe_in_one_line():
  moe = MoEConfig(layer=dict(name="soft_moe"))
  with pytest.raises(ValueError, match=r"^moe.layer='soft_moe' mixes tokens across positions, "
                                       r"so it cannot be causal; use it in an encoder "
                                       r"\(causal=False\)$"):
    TransformerConfig(causal=True, moe=moe, moe_every=2)
  TransformerConfig(causal=False, moe=moe, moe_every=2)  # an encoder is fine
  TransformerConfig(causal=True, moe=MoEConfig(), moe_every=2)  # and a sparse decoder


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_on_a_data_2_expert_4_mesh_equals_one_device(setup):
  layer, params, x = setup
  mask = jnp.asarray(MASK)
  x = jnp.concatenate([x, -x])  # 4 sequences: two per data shard
  mask = jnp.concatenate([mask, mask])
  cot = jax.random.normal(jax.random.key(3), x.shape)
  fn = jax.jit(jax.value_and_grad(
      lambda p, x: jnp.sum(layer.apply({"params": p}, x, token_mask=mask) * cot), argnums=(0, 1)))
  loss_1, grads_1 = fn(params, x)
  mesh = make_mesh({"data": 2, "expert": 4})
  with jax.set_mesh(mesh):
    p_m = jax.device_put(params, NamedSharding(mesh, P()))
    x_m = jax.device_put(x, NamedSharding(mesh, P("data")))
    loss_m, grads_m = fn(p_m, x_m)
    hlo = fn.lower(p_m, x_m).as_text()
  # The slot buffers [E, B*C, D] going into and out of the experts are split over `expert`.
  assert re.search(r'sharding_constraint .*\[\{"expert"\}, \{\}, \{\}\]', hlo)
  np.testing.assert_allclose(loss_m, loss_1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_m), jax.tree.leaves(grads_1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
