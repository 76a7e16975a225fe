"""Upcycling (moe_jax/interop/upcycle.py, experiments.upcycle): a dense model's function is
kept at step 0 (sparse, granular, multiplet), experts hold the dense FFN's pieces, errors
are one line, and the output trains with experiments.train (init_params)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import models
from moe_jax.interop.upcycle import upcycle_variables
from moe_jax.models.lm import DecoderLM

D, F, L = 16, 32, 2
TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 257, (2, 12)), jnp.int32)


def lm(moe=None, num_layers=L, **stack):
  cfg = dict(name="lm", d_model=D, num_layers=num_layers, num_heads=2, mlp_dim=F, causal=True,
             **stack)
  if moe is not None:
    cfg.update(moe=moe, moe_every=2)
  return models.build_model(cfg)


def moe_cfg(E=4, F_e=F, k=2, dispatch="sorted", **router):
  return dict(num_experts=E, expert_hidden_dim=F_e, dispatch=dispatch,
              router=dict(name="top_k", k=k, renormalize=True, **router))


def init(model, seed=0):
  return jax.tree.map(np.asarray, dict(model.init(jax.random.PRNGKey(seed), TOKENS,
                                                  method=DecoderLM.logits)))


def logits(model, variables):
  return np.asarray(model.apply(variables, TOKENS, method=DecoderLM.logits))


def dense_ffn(params, layer=1):
  return params["decoder"]["layers"][f"block_{layer}"]["mlp"]


def experts(params, layer=1, scanned=None):
  """The MoE layer's expert weights ({name: [E, ...]}), unscanned or scan_<j>/block_u[r]."""
  if scanned is None:
    return params["decoder"]["layers"][f"block_{layer}"]["moe"]
  scan, block, r = scanned
  return jax.tree.map(lambda x: x[r], params["decoder"][scan][block]["moe"])


def test_sparse_upcycling_keeps_the_dense_function_and_copies_the_ffn():
  dense, moe = lm(), lm(moe_cfg(E=4, k=2))
  dv, target = init(dense, seed=1), init(moe, seed=0)
  notes = []
  out = upcycle_variables([dv["params"]], target, router_k=2, say=notes.append)
  assert out.pop("layout") == [(0, 0)] * 4
  np.testing.assert_allclose(logits(moe, out), logits(dense, dv), atol=2e-5, rtol=1e-5)
  p, ffn = out["params"], dense_ffn(dv["params"])
  for e in range(4):  # every expert an exact copy of the dense FFN of its layer
    np.testing.assert_array_equal(experts(p)["experts"]["w_up_EDF"][e], ffn["w_up_DF"])
    np.testing.assert_array_equal(experts(p)["experts"]["w_gate_EDF"][e], ffn["w_gate_DF"])
    np.testing.assert_array_equal(experts(p)["experts"]["w_down_EFD"][e], ffn["w_down_FD"])
  # The router is the MoE model's own init; every other parameter the dense model's.
  np.testing.assert_array_equal(experts(p)["router"]["w_DE"],
                                experts(target["params"])["router"]["w_DE"])
  np.testing.assert_array_equal(p["embedding"]["embedding"], dv["params"]["embedding"]["embedding"])
  np.testing.assert_array_equal(p["decoder"]["layers"]["block_1"]["attention"]["w_qkv_D3HQ"],
                                dv["params"]["decoder"]["layers"]["block_1"]["attention"]["w_qkv_D3HQ"])
  assert notes == ["MoE layer 1/1 (decoder/layer[1]): 4 experts from source 0"]


def test_granular_upcycling_keeps_the_dense_function_into_a_scanned_stack():
  """G=2 shards per dense FFN, E=4 (two copies), k=2: a dense (unscanned) 4-layer model
  into a scanned MoE stack ([dense, MoE] x 2); tiled dropless dispatch."""
  G, Fe = 2, F // 2
  dense = lm(num_layers=4)
  moe = lm(moe_cfg(E=4, F_e=Fe, k=2, dispatch="tiled"), num_layers=4, scan_layers=True)
  dv, target = init(dense, seed=1), init(moe, seed=0)
  out = upcycle_variables([dv["params"]], target, granularity=G, router_k=2)
  assert out.pop("layout") == [(0, 0), (0, 1), (0, 0), (0, 1)]
  want = logits(dense, dv)
  np.testing.assert_allclose(logits(moe, out), want, atol=2e-5, rtol=1e-5)
  # Layer 3 is scan_0/block_1 at repeat 1: its experts are the shards of dense layer 3,
  # w_down times G, and its router columns equal within each virtual group.
  ffn = dense_ffn(dv["params"], layer=3)
  got = experts(out["params"], scanned=("scan_0", "block_1", 1))
  for e in range(4):
    g = e % G
    np.testing.assert_array_equal(got["experts"]["w_up_EDF"][e], ffn["w_up_DF"][:, g * Fe:(g + 1) * Fe])
    np.testing.assert_array_equal(got["experts"]["w_gate_EDF"][e],
                                  ffn["w_gate_DF"][:, g * Fe:(g + 1) * Fe])
    np.testing.assert_allclose(got["experts"]["w_down_EFD"][e],
                               G * ffn["w_down_FD"][g * Fe:(g + 1) * Fe], rtol=1e-6)
  w = got["router"]["w_DE"]
  np.testing.assert_array_equal(w[:, 0], w[:, 1])
  np.testing.assert_array_equal(w[:, 2], w[:, 3])
  assert not np.array_equal(w[:, 0], w[:, 2])  # the copies still route differently
  # Without the tie (the init's own router) the shards are weighted unequally.
  untied = jax.tree.map(np.copy, out)
  untied["params"]["decoder"]["scan_0"]["block_1"]["moe"]["router"]["w_DE"] = (
      target["params"]["decoder"]["scan_0"]["block_1"]["moe"]["router"]["w_DE"])
  assert np.abs(logits(moe, untied) - want).max() > 1e-3


def test_multiplet_upcycling_takes_experts_from_each_source():
  dense, moe = lm(), lm(moe_cfg(E=4, k=2))
  a, b, target = init(dense, seed=1), init(dense, seed=2), init(moe, seed=0)
  # Identical sources: the dense function (multiplet of one model).
  same = upcycle_variables([a["params"], a["params"]], target, router_k=2)
  assert same.pop("layout") == [(0, 0), (1, 0), (0, 0), (1, 0)]
  np.testing.assert_allclose(logits(moe, same), logits(dense, a), atol=2e-5, rtol=1e-5)
  # Different sources: experts alternate A, B; non-FFN parameters are A's, with a note.
  notes = []
  out = upcycle_variables([a["params"], b["params"]], target, router_k=2, names=["A", "B"],
                          say=notes.append)
  out.pop("layout")
  got = experts(out["params"])["experts"]["w_up_EDF"]
  for e, src in enumerate([a, b, a, b]):
    np.testing.assert_array_equal(got[e], dense_ffn(src["params"])["w_up_DF"])
  np.testing.assert_array_equal(out["params"]["lm_head"]["kernel"], a["params"]["lm_head"]["kernel"])
  assert notes[0].startswith("note: ") and "the MoE model takes A's" in notes[0]


def test_noise_is_relative_to_each_weight_and_differs_per_expert():
  dense, moe = lm(), lm(moe_cfg(E=4, k=2))
  dv, target = init(dense, seed=1), init(moe, seed=0)
  out = upcycle_variables([dv["params"]], target, router_k=2, noise=0.1, seed=3)
  w, ref = experts(out["params"])["experts"]["w_down_EFD"], dense_ffn(dv["params"])["w_down_FD"]
  rel = [np.std(w[e] - ref) / np.std(ref) for e in range(4)]
  assert all(0.08 < r < 0.12 for r in rel), rel
  assert not np.allclose(w[0], w[1])
