"""AdaMoE null experts (arXiv:2406.13233) on the top_k router: a hand-worked table, null
slots that no dispatcher computes, outputs and gradients against a plain loop, and the
config errors.

Router weights are set so the input rows ARE the logits over [e0, e1, e2 | n0, n1]
(w_DE = the first three columns of the identity, w_null_DE the last two), and the rows
are log-probabilities.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import MoEConfig, MoELayer, TopKRouter
from moe_jax.nn import experts as experts_mod
from moe_jax.nn.dispatch import tiles
from moe_jax.train.step import summarize_moe
from tests import reference

# T=4 tokens x (E=3 real + m=2 null) probabilities; k=3, no ties.
P = np.array([[0.40, 0.05, 0.05, 0.30, 0.20],   # top-3: e0, n0, n1 -> real {e0}
              [0.30, 0.25, 0.20, 0.15, 0.10],   # e0, e1, e2        -> real {e0, e1, e2}
              [0.12, 0.08, 0.05, 0.40, 0.35],   # n0, n1, e0        -> real {e0}
              [0.05, 0.35, 0.30, 0.20, 0.10]])  # e1, e2, n0        -> real {e1, e2}
ROUTER = TopKRouter(num_experts=3, k=3, null_experts=2)
EYE = np.eye(5, dtype=np.float32)
ROUTER_PARAMS = {"w_DE": jnp.asarray(EYE[:, :3]), "w_null_DE": jnp.asarray(EYE[:, 3:])}


def _route(**kw):
  return ROUTER.apply({"params": ROUTER_PARAMS}, jnp.asarray(np.log(P), jnp.float32), **kw)


def test_null_slots_are_unused_and_real_weights_renormalise_over_real_slots():
  d = _route()
  # Slots in score order; a null slot keeps a real index (0) but is masked with weight 0.
  np.testing.assert_array_equal(d.mask_TK, [[1, 0, 0], [1, 1, 1], [0, 0, 1], [1, 1, 0]])
  np.testing.assert_array_equal(np.where(d.mask_TK, d.expert_index_TK, -1),
                                [[0, -1, -1], [0, 1, 2], [-1, -1, 0], [1, 2, -1]])
  # Real weights / their sum: t0 e0 alone -> 1; t1 .30,.25,.20 / .75; t2 e0 -> 1;
  # t3 .35, .30 / .65.
  np.testing.assert_allclose(d.weight_TK, [[1, 0, 0], [0.4, 1 / 3, 0.2 / 0.75], [0, 0, 1],
                                           [0.35 / 0.65, 0.30 / 0.65, 0]], rtol=1e-5)
  np.testing.assert_allclose(d.aux["real_experts_per_token"], (1 + 3 + 1 + 2) / 4, rtol=1e-6)
  # Real slots: e0 x3, e1 x2, e2 x2 of 7.
  np.testing.assert_allclose(d.aux["expert_load_E"], [3 / 7, 2 / 7, 2 / 7], rtol=1e-6)


def test_balance_loss_counts_the_nulls_as_one_averaged_bucket():
  d = _route()
  # f over the 12 slots: e0 3, e1 2, e2 2, n0 3, n1 2 -> the nulls become (3+2)/2 each.
  # P columns (sums over 4 tokens): .87, .73, .60, 1.05, .75.
  # L = 5 * (3*.87 + 2*.73 + 2*.60 + 2.5*(1.05 + .75)) / (12 * 4) = 5 * 9.77 / 48.
  np.testing.assert_allclose(d.aux["load_balance_loss"], 5 * 9.77 / 48, rtol=1e-5)
  # Padding: token 3 masked out -> 9 slots; f: e0 3, e1 1, e2 1, nulls (2+2)/2 each;
  # P sums over tokens 0..2: .82, .38, .30, .85, .65.
  d = _route(token_mask_T=jnp.array([1, 1, 1, 0]))
  want = 5 * (3 * .82 + 1 * .38 + 1 * .30 + 2 * (.85 + .65)) / (9 * 3)
  np.testing.assert_allclose(d.aux["load_balance_loss"], want, rtol=1e-5)
  np.testing.assert_array_equal(d.mask_TK[3], [0, 0, 0])
  np.testing.assert_allclose(d.aux["real_experts_per_token"], 5 / 3, rtol=1e-6)


def _np_null_moe(x, params, k):
  """float64: softmax over the E+m logits, top-k, real slots renormalised, then a plain
  loop over each token's real experts."""
  r, ex = params["router"], params["experts"]
  f64 = lambda a: np.asarray(a, np.float64)
  logits = f64(x) @ np.concatenate([f64(r["w_DE"]), f64(r["w_null_DE"])], axis=1)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  E = r["w_DE"].shape[1]
  y, real = np.zeros_like(f64(x)), 0
  for t in range(x.shape[0]):
    chosen = [e for e in np.argsort(-p[t], kind="stable")[:k] if e < E]
    total = sum(p[t, e] for e in chosen)
    for e in chosen:
      y[t] += p[t, e] / total * reference.np_ffn(
          f64(x[t:t + 1]), f64(ex["w_up_EDF"][e]), f64(ex["w_down_EFD"][e]),
          f64(ex["w_gate_EDF"][e]))[0]
    real += len(chosen)
  return y, real


def _layer(dispatch):
  return MoELayer(MoEConfig(num_experts=4, expert_hidden_dim=8, dispatch=dispatch,
                            capacity_factor=4.0,  # einsum: room for every slot
                            router=dict(name="top_k", k=3, null_experts=3)))


@pytest.mark.parametrize("dispatch", ["sorted", "tiled", "einsum"])
def test_layer_equals_a_loop_over_real_experts_and_null_slots_do_no_work(dispatch, monkeypatch):
  x = jax.random.normal(jax.random.key(0), (16, 8))
  layer = _layer(dispatch)
  params = layer.init(jax.random.key(1), x)["params"]
  # Sharpen the null gate so tokens split between 0..3 real experts.
  params["router"]["w_null_DE"] = params["router"]["w_null_DE"] * 3.0
  want, real = _np_null_moe(np.asarray(x), params, k=3)
  rows = []
  if dispatch == "sorted":  # the rows the grouped matmul runs: sum of its group sizes
    ragged = experts_mod.ExpertWeights.ragged
    monkeypatch.setattr(experts_mod.ExpertWeights, "ragged", lambda self, x_XD, g_E: (
        rows.append(int(np.asarray(g_E).sum())), ragged(self, x_XD, g_E))[1])
  elif dispatch == "tiled":  # rows of the tile layout that hold a slot
    layout_fn = tiles.decision_layout
    monkeypatch.setattr(tiles, "decision_layout", lambda d, e, b: (
        lambda lay: (rows.append(int((np.asarray(lay.row_slot_R) >= 0).sum())), lay)[1])(
            layout_fn(d, e, b)))
  y, coll = layer.apply({"params": params}, x, mutable=["moe_metrics"])
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  assert 16 < real < 48  # some null slots, some tokens with more than one real expert
  metrics = coll["moe_metrics"]["moe"][0]
  np.testing.assert_allclose(metrics["real_experts_per_token"], real / 16, rtol=1e-6)
  # ... and reaches the train step's metrics (mean over MoE layers).
  np.testing.assert_allclose(summarize_moe(coll)["moe/real_experts_per_token"], real / 16,
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["dropped_slot_fraction"], 0.0, atol=1e-7)
  if dispatch != "einsum":
    assert rows == [real]


def test_gradients_equal_a_differentiable_reference():
  x = jax.random.normal(jax.random.key(2), (12, 8))
  layer = _layer("sorted")
  params = layer.init(jax.random.key(3), x)["params"]
  cot = jax.random.normal(jax.random.key(4), x.shape)

  def ref(params, x):  # jnp, independent of the router: softmax, top-k, loop over experts
    r = params["router"]
    logits = x @ jnp.concatenate([r["w_DE"], r["w_null_DE"]], axis=1)
    p = jax.nn.softmax(logits, axis=-1)
    top_p, top_i = jax.lax.top_k(p, 3)
    real = top_i < 4
    w = jnp.where(real, top_p, 0.0)
    w = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-30)
    ex = experts_mod.ExpertWeights(**params["experts"])
    return jnp.sum(reference.jnp_loop_moe(x, top_i, w, real, ex) * cot)

  def got(params, x):
    return jnp.sum(layer.apply({"params": params}, x) * cot)

  g_ref = jax.grad(ref, argnums=(0, 1))(params, x)
  g_got = jax.grad(got, argnums=(0, 1))(params, x)
  # Renormalised over the real slots, the weights do not depend on the null logits: the
  # null gate learns from the balance loss only (as in the authors' code).
  assert float(jnp.abs(g_got[0]["router"]["w_DE"]).max()) > 1e-4
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_got)[0], jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("options, message", [
    (dict(k=2, null_experts=-1), r"null_experts=-1 is out of range; allowed: 0 <= null_experts"),
    (dict(k=6, null_experts=1), r"k=6 is out of range; allowed: 1 <= k <= 5"),
    (dict(k=2, null_experts=2, n_group=2, topk_group=1),
     r"null_experts=2 needs n_group=1, no bias balancing and fused=False"),
])
def test_bad_null_expert_settings_are_one_line_errors(options, message):
  with pytest.raises(ValueError, match=message):
    MoEConfig(num_experts=4, router=dict(name="top_k", **options))
