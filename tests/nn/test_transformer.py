"""Transformer stacks: MoE placement, causality, scan == loop, remat == plain."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import (ExpertWeights, MoEConfig, TransformerConfig, TransformerStack, scan_plan,
                     sum_aux_losses)
from tests import reference

MOE = MoEConfig(num_experts=4, router=dict(name="top_k", k=2), expert_hidden_dim=16,
                dispatch="sorted")
B, S, D = 2, 6, 16


def small(**kw):
  return TransformerConfig(**{"num_layers": 4, "d_model": D, "num_heads": 2, "mlp_dim": 32,
                              "moe": MOE, **kw})


def test_moe_placement_rules():
  assert small(moe_every=2).moe_layer_indices() == (1, 3)
  assert TransformerConfig(num_layers=12, moe=MOE, moe_last=6).moe_layer_indices() == tuple(
      range(6, 12))
  assert small(moe_layers=(0, 2)).moe_layer_indices() == (0, 2)
  assert small(moe_every=4, moe_layers=(0,)).moe_layer_indices() == (0, 3)
  assert small().moe_layer_indices() == ()


def test_params_put_moe_where_placed():
  cfg = small(moe_layers=(0, 2))
  params = TransformerStack(cfg).init(jax.random.key(0), jnp.ones((B, S, D)))["params"]
  kinds = {name: ("moe" in block) for name, block in params["layers"].items()}
  assert kinds == {"block_0": True, "block_1": False, "block_2": True, "block_3": False}


def test_scan_plan():
  F, M = False, True
  assert scan_plan((F, M) * 3) == [((F, M), 3)]
  assert scan_plan((F,) * 6 + (M,) * 6) == [((F,), 6), ((M,), 6)]
  assert scan_plan((F, F, M, F)) == [((F,), 2), ((M,), 1), ((F,), 1)]
  assert scan_plan((F,) * 5) == [((F,), 5)]


def _stack_to_scanned(params, pattern):
  """Re-lays loop params (layers/block_i) into the scanned layout (scan_j/block_u)."""
  out, i = {}, 0
  for j, (unit, repeats) in enumerate(scan_plan(pattern)):
    blocks = [params["layers"][f"block_{i + r * len(unit) + u}"]
              for r in range(repeats) for u in range(len(unit))]
    out[f"scan_{j}"] = {
        f"block_{u}": jax.tree.map(lambda *a: jnp.stack(a), *blocks[u::len(unit)])
        for u in range(len(unit))}
    i += repeats * len(unit)
  out["final_norm"] = params["final_norm"]
  return out


@pytest.mark.parametrize("placement", [dict(moe_every=2), dict(moe_last=1)])
def test_scanned_stack_equals_loop(placement):
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  loop = TransformerStack(small(**placement))
  scanned = TransformerStack(small(scan_layers=True, remat=True, **placement))
  params = loop.init(jax.random.key(1), x)["params"]
  pattern = tuple(i in loop.config.moe_layer_indices() for i in range(4))
  sparams = _stack_to_scanned(params, pattern)
  assert jax.tree.structure(sparams) == jax.tree.structure(
      scanned.init(jax.random.key(1), x)["params"])
  y_loop, st_loop = loop.apply({"params": params}, x, mutable=["aux_loss"])
  y_scan, st_scan = scanned.apply({"params": sparams}, x, mutable=["aux_loss"])
  np.testing.assert_allclose(y_scan, y_loop, rtol=1e-5, atol=1e-5)
  assert sum_aux_losses(st_loop) > 0  # the stacks sowed their balance losses
  np.testing.assert_allclose(sum_aux_losses(st_scan), sum_aux_losses(st_loop), rtol=1e-5)
  g = lambda m, p: jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x) ** 3))(p)
  g_scan = _stack_to_scanned(g(loop, params), pattern)
  for a, b in zip(jax.tree.leaves(g(scanned, sparams)), jax.tree.leaves(g_scan)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _position_gradients(cfg, t):
  """|d sum(y[:, t]) / d x[:, s]| for every s."""
  stack = TransformerStack(cfg)
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  params = stack.init(jax.random.key(1), x)["params"]
  g = jax.grad(lambda x: jnp.sum(stack.apply({"params": params}, x)[:, t] ** 2))(x)
  return np.abs(np.asarray(g)).sum(axis=(0, 2))


def test_decoder_is_causal():
  t = 3
  g = _position_gradients(small(causal=True, moe_every=2), t)
  assert np.all(g[t + 1:] == 0.0)  # future positions do not influence position t
  assert np.all(g[:t + 1] > 0.0)


def test_encoder_sees_both_directions():
  g = _position_gradients(small(causal=False, moe_every=2), 3)
  assert np.all(g > 0.0)


def test_key_padding_mask_hides_padded_positions():
  cfg = small(moe_every=2)
  stack = TransformerStack(cfg)
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  params = stack.init(jax.random.key(1), x)["params"]
  mask = jnp.arange(S)[None, :].repeat(B, 0) < 4
  g = jax.grad(lambda x: jnp.sum(
      stack.apply({"params": params}, x, mask_BS=mask)[:, :4] ** 2))(x)
  # Padded positions 4, 5 reach real positions only through nothing: zero gradient.
  assert float(jnp.abs(g[:, 4:]).sum()) == 0.0


def test_dropout_and_jitter_need_rngs_only_in_training():
  cfg = small(moe=MoEConfig(num_experts=4, router=dict(name="top_k", k=2, jitter=0.1),
                            expert_hidden_dim=16),
              moe_every=2, dropout_rate=0.1)
  stack = TransformerStack(cfg)
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  params = stack.init(jax.random.key(1), x)["params"]
  y_eval = stack.apply({"params": params}, x)
  y_train = stack.apply({"params": params}, x, deterministic=False,
                        rngs={"dropout": jax.random.key(2), "jitter": jax.random.key(3)})
  assert not np.allclose(y_eval, y_train)


def test_stack_rejects_wrong_model_dim():
  with pytest.raises(ValueError, match="d_model=16"):
    TransformerStack(small()).init(jax.random.key(0), jnp.ones((B, S, 8)))


def test_stack_matches_numpy_reference_with_padding():
  """A dense block then a MoE block (pre-norm, residuals, final norm), in float64 numpy.

  The scan, remat and mesh tests compare library paths with each other; this pins
  the computation they share. Padded tokens are masked as keys and get no expert.
  """
  cfg = small(num_layers=2, moe_layers=(1,))
  stack = TransformerStack(cfg)
  x = jax.random.normal(jax.random.key(0), (B, S, D))
  mask = jnp.array([[1, 1, 1, 1, 0, 0], [1] * S], bool)
  params = stack.init(jax.random.key(1), x, mask_BS=mask)["params"]
  # Non-trivial norm scales, so a norm applied in the wrong place shows.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p * (1 + 0.5 * jax.random.uniform(jax.random.key(len(str(path))), p.shape))
      if path[-1].key == "scale" else p, params)
  y = stack.apply({"params": params}, x, mask_BS=mask)

  eps = cfg.norm_eps
  h = np.asarray(x, np.float64)
  mask_np = np.asarray(mask)
  for i in range(2):
    p = params["layers"][f"block_{i}"]
    a = p["attention"]
    h = h + reference.np_attention(reference.np_rms_norm(h, p["attention_norm"]["scale"], eps),
                                   a["w_qkv_D3HQ"], a["w_out_HQD"], mask_np)
    z = reference.np_rms_norm(h, p["ffn_norm"]["scale"], eps)
    if i == 0:
      m = {k: np.asarray(v, np.float64) for k, v in p["mlp"].items()}
      h = h + reference.np_ffn(z, m["w_up_DF"], m["w_down_FD"], m["w_gate_DF"])
    else:
      z_TD = z.reshape(-1, D)
      index, weight = reference.np_top_k_routing(z_TD, p["moe"]["router"]["w_DE"], 2)
      keep = np.broadcast_to(mask_np.reshape(-1, 1), index.shape)
      ex = p["moe"]["experts"]
      experts = ExpertWeights(w_up_EDF=ex["w_up_EDF"], w_down_EFD=ex["w_down_EFD"],
                              w_gate_EDF=ex["w_gate_EDF"], activation="swiglu")
      h = h + reference.np_moe(z_TD, index, weight, keep, experts).reshape(B, S, D)
  want = reference.np_rms_norm(h, params["final_norm"]["scale"], eps)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
