"""Pyramid-MoE (DeepSpeed-MoE, arXiv:2201.05596): an expert count per MoE layer."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import MoEConfig, TransformerConfig, TransformerStack, scan_plan
from moe_jax.parallel.partitioning import check_mesh_fits
from moe_jax.parallel.sharding import make_mesh

D = 8


def _config(dispatch="sorted", layer="moe", **kw):
  moe = MoEConfig(num_experts=4, expert_hidden_dim=8, router=dict(name="top_k", k=2),
                  dispatch=dispatch, layer=layer)
  return TransformerConfig(**{**dict(num_layers=6, d_model=D, num_heads=2, mlp_dim=8, moe=moe,
                                     moe_every=2, moe_num_experts=(2, 2, 4)), **kw})


def test_scan_plan_scans_runs_of_equal_units_of_a_pyramid():
  assert scan_plan((0, 2, 0, 2, 0, 4)) == [((0, 2), 2), ((0, 4), 1)]
  assert scan_plan((0, 0, 2, 2, 4, 4)) == [((0,), 2), ((2,), 2), ((4,), 2)]
  assert scan_plan((2, 4) * 3) == [((2, 4), 3)]  # a period still wins
  F, M = False, True  # two kinds (dense / MoE): the cut is the one it always was
  assert scan_plan((F, F, M, F)) == [((F,), 2), ((M,), 1), ((F,), 1)]


@pytest.mark.parametrize("scan", [False, True])
def test_parameter_shapes_follow_the_configured_counts(scan):
  cfg = _config(scan_layers=scan)
  assert cfg.moe_experts_by_layer() == {1: 2, 3: 2, 5: 4}
  shapes = jax.eval_shape(lambda: TransformerStack(cfg).init(
      jax.random.key(0), jnp.zeros((2, 4, D))))["params"]
  if scan:  # [dense, E=2] x 2 then [dense, E=4] x 1
    moe = [(shapes["scan_0"]["block_1"]["moe"], 2), (shapes["scan_1"]["block_1"]["moe"], 1)]
    counts = [(2, 2), (4, 1)]
  else:
    moe = [(shapes["layers"][f"block_{i}"]["moe"], None) for i in (1, 3, 5)]
    counts = [(2, None), (2, None), (4, None)]
    assert all("mlp" in shapes["layers"][f"block_{i}"] for i in (0, 2, 4))
  for (p, repeats), (E, _) in zip(moe, counts):
    lead = () if repeats is None else (repeats,)
    assert p["experts"]["w_up_EDF"].shape == lead + (E, D, 8)
    assert p["experts"]["w_down_EFD"].shape == lead + (E, 8, D)
    assert p["router"]["w_DE"].shape == lead + (D, E)


def _to_scanned(params, cfg):
  """Unrolled stack parameters -> the scanned stack's layout (stacked per scan piece)."""
  pattern = tuple(cfg.moe_experts_by_layer().get(i, 0) for i in range(cfg.num_layers))
  out, i = {"final_norm": params["final_norm"]}, 0
  for j, (unit, repeats) in enumerate(scan_plan(pattern)):
    blocks = {}
    for b in range(len(unit)):
      layers = [params["layers"][f"block_{i + r * len(unit) + b}"] for r in range(repeats)]
      blocks[f"block_{b}"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    out[f"scan_{j}"] = blocks
    i += len(unit) * repeats
  return out


@pytest.mark.parametrize("dispatch, layer", [("sorted", "moe"), ("sorted", "soft_moe"),
                                             ("tiled", "residual")])
def test_scanned_and_unrolled_pyramids_agree_from_the_same_weights(dispatch, layer):
  cfg = _config(dispatch, layer, remat=layer != "moe")
  scan_cfg = dataclasses.replace(cfg, scan_layers=True)
  x = jax.random.normal(jax.random.key(0), (2, 5, D))
  mask = jnp.ones((2, 5), bool).at[1, 3:].set(False)
  params = TransformerStack(cfg).init(jax.random.key(1), x)["params"]
  sparams = _to_scanned(params, cfg)
  want = jax.eval_shape(lambda: TransformerStack(scan_cfg).init(jax.random.key(1), x))["params"]
  assert jax.tree.structure(sparams) == jax.tree.structure(want)
  cot = jax.random.normal(jax.random.key(2), x.shape)

  def run(c, p):
    return jax.value_and_grad(lambda p: jnp.sum(
        TransformerStack(c).apply({"params": p}, x, mask_BS=mask) * cot))(p)

  loss, grads = run(cfg, params)
  loss_s, grads_s = run(scan_cfg, sparams)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(_to_scanned(grads, cfg))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw, message", [
    (dict(moe_num_experts=(2, 4)), r"^moe_num_experts=\(2, 4\) needs one count per MoE layer; "
                                   r"the stack has 3 MoE layer\(s\) at \[1, 3, 5\]$"),
    (dict(moe_num_experts=(2, 0, 4)), r"^moe_num_experts\[1\]=0 \(layer 3\) must be an int >= 1$"),
    (dict(moe_num_experts=(2, 1, 4)), r"^moe_num_experts\[1\]=1 \(layer 3\): k=2 is out of range"),
])
def test_bad_counts_fail_at_config_build_naming_the_layer(kw, message):
  with pytest.raises(ValueError, match=message):
    _config(**kw)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_a_mesh_that_does_not_divide_a_layers_count_names_the_layer():
  mesh = make_mesh({"data": 2, "expert": 4})
  check_mesh_fits(mesh, {1: 4, 3: 8}, {"t": 8})
  with pytest.raises(ValueError, match=r"^model.moe_num_experts\[1\]=6 \(layer 3\) is not "
                                       r"divisible by mesh.expert=4$"):
    check_mesh_fits(mesh, {1: 4, 3: 6}, {"t": 8})
