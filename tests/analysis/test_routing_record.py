"""The routing record MoELayer sows when asked: the router's own choices, per token."""
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import MoEConfig
from moe_jax.nn.context import Context
from moe_jax.nn.layers.moe import MoELayer

B, S, D, E = 2, 8, 8, 4


def test_record_holds_the_routers_top_k_and_the_capacity_drops():
  # capacity 0.25 with 16 tokens, E=4, k=2: 2 slots per expert of the 32 chosen.
  cfg = MoEConfig(num_experts=E, router=dict(name="top_k", k=2), expert_hidden_dim=16,
                  dispatch="einsum", capacity_factor=0.25, eval_capacity_factor=0.25)
  layer = MoELayer(cfg)
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  variables = layer.init(jax.random.key(1), x)
  mask = jnp.ones((B, S), bool).at[1, -3:].set(False)
  ctx = Context.for_batch(B, modality_id=2)
  _, plain = layer.apply(variables, x, token_mask=mask, context=ctx, mutable=["moe_metrics"])
  assert "routing" not in plain  # sown only when asked for
  _, coll = layer.apply(variables, x, token_mask=mask, context=ctx,
                        mutable=["moe_metrics", "routing"])
  (rec,) = coll["routing"]["moe"]
  assert rec["expert_index"].shape == (B, S, 2) and rec["probs"].shape == (B, S, E)
  # The reference: softmax of x @ w_DE, its two largest, renormalised.
  logits = np.einsum("bsd,de->bse", np.asarray(x), np.asarray(variables["params"]["router"]["w_DE"]))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(rec["probs"], probs, rtol=1e-5, atol=1e-6)
  top2 = np.argsort(-probs, -1)[..., :2]
  real = np.asarray(mask)
  np.testing.assert_array_equal(np.asarray(rec["expert_index"])[real], top2[real])
  w = np.take_along_axis(probs, top2, -1)
  np.testing.assert_allclose(np.asarray(rec["weight"])[real], (w / w.sum(-1, keepdims=True))[real],
                             rtol=1e-5)
  np.testing.assert_array_equal(rec["token_valid"], real)
  assert np.all(np.asarray(rec["modality"]) == 2) and int(rec["num_experts"]) == E
  # Kept slots: at most 2 per expert, none on padding, and the layer's own drop metric.
  kept = np.asarray(rec["kept"])
  assert not kept[~real].any()
  per_expert = np.bincount(np.asarray(rec["expert_index"])[kept], minlength=E)
  assert per_expert.max() <= 2
  (metrics,) = coll["moe_metrics"]["moe"]
  valid = np.asarray(rec["valid"]) & real[..., None]
  np.testing.assert_allclose(1 - kept.sum() / valid.sum(), metrics["dropped_slot_fraction"],
                             rtol=1e-6)
