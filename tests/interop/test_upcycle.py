"""Upcycling (moe_jax/interop/upcycle.py, experiments.upcycle): a dense model's function is
kept at step 0 (sparse, granular, multiplet), experts hold the dense FFN's pieces, errors
are one line, and the output trains with experiments.train (init_params)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import models
from moe_jax.interop.upcycle import check_layout, find_checkpoint, upcycle_variables
from moe_jax.models.lm import DecoderLM

D, F, L = 16, 32, 2
TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 257, (2, 12)), jnp.int32)


def lm(moe=None, num_layers=L, mlp_dim=F, **stack):
  cfg = dict(name="lm", d_model=D, num_layers=num_layers, num_heads=2, mlp_dim=mlp_dim,
             causal=True, **stack)
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
  attention = lambda params: params["decoder"]["layers"]["block_1"]["attention"]["w_qkv_D3HQ"]
  np.testing.assert_array_equal(attention(p), attention(dv["params"]))
  assert notes == ["MoE layer 1/1 (decoder/layer[1]): 4 experts from source 0"]
  # The same dense model saved with scan_layers (all L layers stacked in scan_0/block_0).
  layers = dv["params"]["decoder"]["layers"]
  scanned = {**dv["params"], "decoder": {
      "final_norm": dv["params"]["decoder"]["final_norm"],
      "scan_0": {"block_0": jax.tree.map(lambda *x: np.stack(x),
                                         *[layers[f"block_{i}"] for i in range(L)])}}}
  again = upcycle_variables([scanned], target, router_k=2)
  again.pop("layout")
  assert jax.tree.structure(again) == jax.tree.structure(out)
  for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(out)):
    np.testing.assert_array_equal(x, y)


def test_a_lora_moe_target_keeps_the_dense_ffn_under_its_adapters():
  dense = lm()
  lora = models.build_model(dict(
      name="lm", d_model=D, num_layers=L, num_heads=2, mlp_dim=F, causal=True, moe_every=1,
      moe=dict(num_experts=4, expert_hidden_dim=4, dispatch="sorted", experts="lora",
               layer=dict(name="lora_moe", mlp_dim=F), router=dict(name="top_k", k=2))))
  dv, target = init(dense, seed=1), init(lora, seed=0)
  notes = []
  out = upcycle_variables([dv["params"]], target, say=notes.append)
  out.pop("layout")
  np.testing.assert_allclose(logits(lora, out), logits(dense, dv), atol=2e-5, rtol=1e-5)
  for i in range(L):
    layer = out["params"]["decoder"]["layers"][f"block_{i}"]["moe"]
    for name, w in dense_ffn(dv["params"], i).items():
      np.testing.assert_array_equal(layer["mlp"][name], w)
    np.testing.assert_array_equal(layer["lora"]["experts"]["w_up_EDF"],  # adapters: the init
                                  target["params"]["decoder"]["layers"][f"block_{i}"]["moe"][
                                      "lora"]["experts"]["w_up_EDF"])
  assert len(notes) == L and "dense FFN kept under the LoRA experts" in notes[0]
  with pytest.raises(ValueError, match=r"lora_moe layer .* takes one source and granularity 1"):
    upcycle_variables([dv["params"]] * 2, target)


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
    shard = slice(e % G * Fe, (e % G + 1) * Fe)
    np.testing.assert_array_equal(got["experts"]["w_up_EDF"][e], ffn["w_up_DF"][:, shard])
    np.testing.assert_array_equal(got["experts"]["w_gate_EDF"][e], ffn["w_gate_DF"][:, shard])
    np.testing.assert_allclose(got["experts"]["w_down_EFD"][e], G * ffn["w_down_FD"][shard],
                               rtol=1e-6)
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
  np.testing.assert_array_equal(out["params"]["lm_head"]["kernel"],
                                a["params"]["lm_head"]["kernel"])
  assert notes[0].startswith("note: ") and "the MoE model takes A's" in notes[0]


def test_deepseek_style_router_keeps_the_function_and_its_state_comes_from_the_init():
  """Sigmoid scores, routed_scaling_factor 2.5 (divided out of w_down), a balancing bias
  in router_state (the MoE init's, carried into the output), G=2."""
  dense = lm()
  moe = lm(moe_cfg(E=4, F_e=F // 2, k=2, score="sigmoid", routed_scaling_factor=2.5,
                   bias_update_rate=1e-3))
  dv, target = init(dense, seed=1), init(moe, seed=0)
  assert target["router_state"]  # the bias exists, so the output must carry it
  out = upcycle_variables([dv["params"]], target, granularity=2, router_k=2, combine_sum=2.5)
  out.pop("layout")
  assert jax.tree.structure(out["router_state"]) == jax.tree.structure(target["router_state"])
  for got, want in zip(jax.tree.leaves(out["router_state"]),
                       jax.tree.leaves(target["router_state"])):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(logits(moe, out), logits(dense, dv), atol=2e-5, rtol=1e-5)


def test_noise_is_relative_to_each_weight_and_differs_per_expert():
  dense, moe = lm(), lm(moe_cfg(E=4, k=2))
  dv, target = init(dense, seed=1), init(moe, seed=0)
  out = upcycle_variables([dv["params"]], target, router_k=2, noise=0.1, seed=3)
  w, ref = experts(out["params"])["experts"]["w_down_EFD"], dense_ffn(dv["params"])["w_down_FD"]
  rel = [np.std(w[e] - ref) / np.std(ref) for e in range(4)]
  assert all(0.08 < r < 0.12 for r in rel), rel
  assert not np.allclose(w[0], w[1])


def test_settings_the_sources_cannot_fill_are_one_line_errors():
  dense, moe = lm(), lm(moe_cfg(E=4, k=2))
  dv, target = init(dense, seed=1), init(moe, seed=0)
  with pytest.raises(ValueError, match=r"^num_experts=4 is not a multiple of the number of "
                                       r"sources \(3\): each source must give the same number "
                                       r"of experts$"):
    upcycle_variables([dv["params"]] * 3, target)
  with pytest.raises(ValueError, match=r"^granularity=2 needs the router's k=1 to be a multiple "
                                       r"of 2: a token must reach all 2 shards of each copy it "
                                       r"picks$"):
    check_layout(4, 1, 2, router_k=1)
  six = init(lm(moe_cfg(E=6, F_e=10, k=3)))  # E a multiple of G=3, but F=32 is not
  with pytest.raises(ValueError, match=r"^granularity=3 does not divide the dense FFN width "
                                       r"F=32 \(decoder/layer\[1\]/mlp/w_up_DF, shape "
                                       r"\(16, 32\)\)$"):
    upcycle_variables([dv["params"]], six, granularity=3)


def test_a_config_that_does_not_match_the_dense_model_names_the_parameter():
  dense = lm()
  dv = init(dense, seed=1)
  narrow = init(lm(moe_cfg(E=4, F_e=8, k=2)))
  with pytest.raises(ValueError, match=r"^decoder/layer\[1\]/moe/experts/w_up_EDF has shape "
                                       r"\(4, 16, 8\) in the MoE config's model but the dense "
                                       r"decoder/layer\[1\]/mlp/w_up_DF \(16, 32\) upcycles "
                                       r"\(granularity=1\) to \(4, 16, 32\): the config does not "
                                       r"match the dense model$"):
    upcycle_variables([dv["params"]], narrow)
  wide = init(lm(moe_cfg(E=4, k=2), mlp_dim=2 * F))  # the dense layer 0 is wider there
  with pytest.raises(ValueError, match=r"^decoder/layer\[0\]/mlp/w_\w+ has shape \(\d+, \d+\) "
                                       r"in source 0 and \(\d+, \d+\) in the MoE config's model: "
                                       r"the config does not match the dense model$"):
    upcycle_variables([dv["params"]], wide)
  with pytest.raises(ValueError, match=r"^w_up_DF has shape \(16, 64\) in B and \(16, 32\) in A: "
                                       r"multiplet sources must be one architecture$"):
    upcycle_variables([{"w_up_DF": np.zeros((16, 32))}, {"w_up_DF": np.zeros((16, 64))}],
                      {"params": {}}, names=["A", "B"])


def test_a_src_without_a_checkpoint_is_one_line(tmp_path):
  with pytest.raises(ValueError, match=r"holds no checkpoint: give a workdir of "
                                       r"experiments.train, one of its checkpoints/<step> "
                                       r"directories, or a params directory$"):
    find_checkpoint(str(tmp_path))
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(ValueError, match=r"^--src=\S+ holds no checkpoint \(\S+/checkpoints has "
                                       r"no <step> directory\)$"):
    find_checkpoint(str(tmp_path))


# The shipped lm_tiny configs, shrunk: 2 layers (layer 1 MoE), 2 steps, one eval batch.
TINY = ["--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.mlp_dim=64",
        "--config.tasks.stdlib_lm.source_args.seq_len=32", "--config.train.num_steps=2",
        "--config.train.log_every=1", "--config.train.eval_every=2",
        "--config.train.checkpoint_every=2", "--config.train.eval_batches=1",
        "--config.train.async_checkpoints=False"]
# Multiplet of two identical sources x granularity 2: E = 2 x 2, experts 64/2 wide, k=2.
MOE = ["--config.model.moe.num_experts=4", "--config.model.moe.expert_hidden_dim=32",
       "--config.model.moe.dispatch=sorted"]


def _apply(config, overrides):
  for arg in overrides:
    key, value = arg[len("--config."):].split("=")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
  return config


def test_upcycle_cli_then_train_on_a_data_2_expert_4_mesh_and_resume(tmp_path):
  """Dense lm_tiny trained 2 steps -> experiments.upcycle (the same checkpoint twice,
  granularity 2) -> experiments.train from DST/params on data=2 x expert=4 with a ~0
  learning rate: its eval loss is the dense model's (the function is kept); then resumes."""
  from experiments.configs import lm_tiny_dense
  from moe_jax.train import train_and_evaluate
  from tests.train.runs import REPO, cache_env, cli

  dense_wd, dst, ft = tmp_path / "dense", tmp_path / "up", tmp_path / "ft"
  # The dense run on data=8 and the upcycling on one device: its reader needs no topology.
  dense = train_and_evaluate(_apply(lm_tiny_dense.get_config("smoke"),
                                    [*TINY, "--config.mesh.data=8"]), str(dense_wd))
  env = cache_env(tmp_path)
  config = "--config=experiments/configs/lm_tiny.py:smoke"
  up = subprocess.run([sys.executable, "-m", "experiments.upcycle", f"--src={dense_wd},{dense_wd}",
                       f"--dst={dst}", "--granularity=2", config, *TINY, *MOE], cwd=REPO,
                      capture_output=True, text=True, timeout=600,
                      env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  assert up.returncode == 0, up.stderr[-2000:]
  assert "MoE layer 1/1 (decoder/layer[1]): 4 experts from 2 sources, 2 shards each" in up.stdout
  assert sorted(os.listdir(dst)) == ["params", "upcycled.json"]
  record = json.load(open(dst / "upcycled.json"))
  assert record["experts"] == [{"source": 0, "shard": 0}, {"source": 0, "shard": 1},
                               {"source": 1, "shard": 0}, {"source": 1, "shard": 1}]
  assert f"--config.train.init_params={dst}/params" in record["train_command"]
  train = [config, *TINY, *MOE, f"--config.train.init_params={dst}/params",
           "--config.mesh.data=2", "--config.mesh.expert=4",
           "--config.optimizer.learning_rate=1e-12", f"--workdir={ft}"]
  run = cli(*train, env=env)
  assert run.returncode == 0, run.stderr[-2000:]
  assert f"parameters from {dst}/params" in run.stdout
  summary = json.load(open(ft / "summary.json"))
  np.testing.assert_allclose(summary["eval"]["stdlib_lm"]["loss"],
                             dense["eval"]["stdlib_lm"]["loss"], rtol=1e-5)
  again = cli(*train, "--config.train.num_steps=3", env=env)
  assert again.returncode == 0, again.stderr[-2000:]
  assert f"resumed from {ft}/checkpoints at step 2" in again.stdout
  assert "parameters from" not in again.stdout
  assert json.load(open(ft / "summary.json"))["final_step"] == 3
  # Into lora_moe layers (the whole FFN frozen under the adapters) from the same run.
  from experiments.configs import lm_tiny_lora
  from moe_jax.interop.upcycle import upcycle
  lora = _apply(lm_tiny_lora.get_config("smoke"), [*TINY[:3], "--config.model.moe.layer.mlp_dim=64"])
  record = upcycle([str(dense_wd)], str(tmp_path / "lora"), lora, say=lambda s: None)
  assert record["experts"] == [] and os.path.isdir(tmp_path / "lora" / "params")


def test_upcycle_cli_error_is_one_line_and_writes_nothing(tmp_path):
  from tests.train.runs import REPO
  bad = subprocess.run([sys.executable, "-m", "experiments.upcycle", f"--src={tmp_path}",
                        f"--dst={tmp_path / 'out'}", "--config=experiments/configs/lm_tiny.py"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
      f"error: --src={tmp_path} holds no checkpoint: give a workdir of experiments.train, one "
      "of its checkpoints/<step> directories, or a params directory")
  assert not (tmp_path / "out").exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".upcycle-")]


def test_layers_without_a_place_for_the_ffn_are_refused_and_unkept_functions_noted(tmp_path):
  from experiments.configs import lm_tiny
  from moe_jax.interop.upcycle import upcycle
  src = tmp_path / "params"
  src.mkdir()
  (src / "_METADATA").write_text("{}")  # looks like a params directory; never read below
  for layer in ("residual", "soft_moe"):
    c = lm_tiny.get_config("smoke")
    c.model.causal = layer != "soft_moe"  # Soft MoE is encoder-only
    c.model.moe.layer = {"name": layer}
    with pytest.raises(ValueError, match=f"model.moe.layer='{layer}' cannot be upcycled into; "
                                         "upcycling fills moe, lora_moe layers"):
      upcycle([str(src)], str(tmp_path / "dst"), c, say=lambda s: None)
  c = lm_tiny.get_config("smoke")
  c.model.moe.router.k = 1
  notes = []
  with pytest.raises(Exception):  # the fake source cannot be read: after the notes
    upcycle([str(src)], str(tmp_path / "dst"), c, say=notes.append)
  assert any("router 'top_k' (k=1, renormalize=False) does not give each token combine "
             "weights that sum to 1" in n for n in notes)
  assert not (tmp_path / "dst").exists()
