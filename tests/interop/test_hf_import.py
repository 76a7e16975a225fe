"""Hugging Face MoE checkpoints in and out, against transformers' own float32 logits.

The fixtures (tests/interop/fixtures/<family>) were made by tools/make_hf_fixtures.py
with transformers on CPU torch: tiny random models, their logits on a batch of tokens.
"""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.interop import hf_families
from moe_jax.interop.hf import load_hf, save_hf
from moe_jax.interop.safetensors_io import TensorReader
from moe_jax.models import build_model

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


def _logits(model, variables, tokens):
  module = build_model(model)
  return np.asarray(module.apply(variables, jnp.asarray(tokens), method=module.logits))


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_match_transformers(family):
  path = os.path.join(FIXTURES, family)
  model, variables = load_hf(path)
  ref = np.load(os.path.join(path, "reference.npz"))
  # The issue asks for 1e-4; measured differences are <= 6e-6, and 2e-5 also catches an
  # epsilon mistake in a norm (DeepSeek's latent norms: ~1e-4).
  np.testing.assert_allclose(_logits(model, variables, ref["tokens"]), ref["logits"], atol=2e-5,
                             rtol=0)
  assert np.abs(ref["logits"]).max() > 1.0  # not a trivially small output


def test_the_family_configs_use_the_features_they_are_meant_to_check():
  read = lambda f: hf_families.model_config(json.load(open(os.path.join(FIXTURES, f,
                                                                        "config.json"))))
  mixtral, qwen2, qwen3, olmoe, deepseek = (read(f) for f in FAMILIES)
  assert mixtral["num_kv_heads"] == 2 and mixtral["moe"]["router"]["renormalize"]
  assert mixtral["rope_max_wavelength"] == 1e6 and mixtral["moe_layers"] == (0, 1, 2)
  assert mixtral["sliding_window"] == 5 and qwen2["sliding_window"] is None
  assert qwen2["qkv_bias"] and qwen2["moe"]["shared_expert_gate"] and qwen2["moe_layers"] == (1, 2)
  assert not qwen2["moe"]["router"]["renormalize"]
  assert qwen3["qk_norm"] == "head" and qwen3["moe_layers"] == (0, 2) and qwen3["head_dim"] == 8
  assert olmoe["qk_norm"] == "full" and not olmoe["moe"]["router"]["renormalize"]
  assert deepseek["mla"]["q_lora_rank"] == 24 and deepseek["mla"]["rope_interleave"]
  assert deepseek["moe_layers"] == (1, 2) and deepseek["moe"]["num_shared_experts"] == 1
  router = deepseek["moe"]["router"]
  assert (router["score"], router["n_group"], router["topk_group"]) == ("sigmoid", 4, 2)
  assert router["routed_scaling_factor"] == 2.5 and router["bias_update_rate"] > 0


def test_mixtral_sliding_window_changes_the_logits():
  model, variables = load_hf(os.path.join(FIXTURES, "mixtral"))
  ref = np.load(os.path.join(FIXTURES, "mixtral", "reference.npz"))
  unwindowed = _logits(dict(model, sliding_window=None), variables, ref["tokens"])
  assert np.abs(unwindowed[:, 5:] - ref["logits"][:, 5:]).max() > 1e-3  # the window matters
  np.testing.assert_allclose(unwindowed[:, :5], ref["logits"][:, :5], atol=2e-5)  # not before


def test_deepseek_correction_bias_is_router_state_and_steers_the_choice():
  model, variables = load_hf(os.path.join(FIXTURES, "deepseek_v3"))
  bias = variables["router_state"]["decoder"]["layers"]["block_1"]["moe"]["router"]["bias_E"]
  assert bias.shape == (8,) and np.abs(bias).max() > 0.01
  ref = np.load(os.path.join(FIXTURES, "deepseek_v3", "reference.npz"))
  import jax
  unbiased = jax.tree.map(np.zeros_like, variables["router_state"])
  moved = _logits(model, {**variables, "router_state": unbiased}, ref["tokens"])
  assert np.abs(moved - ref["logits"]).max() > 1e-3  # the bias changes which experts run


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_export_writes_the_same_tensors_and_reimports_exactly(family, tmp_path):
  src = os.path.join(FIXTURES, family)
  model, params = load_hf(src)
  hf_config = json.load(open(os.path.join(src, "config.json")))
  files = save_hf(model, params, str(tmp_path), hf_config, max_shard_bytes=60_000)
  assert "model.safetensors.index.json" in files  # sharded on the way out too
  a, b = TensorReader(src), TensorReader(str(tmp_path))
  assert a.names() == b.names()
  for name in a.names():
    np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
  model2, params2 = load_hf(str(tmp_path))
  assert model2 == model
  import jax
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(x, y)


def test_transformers_loads_an_export(tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  src = os.path.join(FIXTURES, "qwen3_moe")
  model, params = load_hf(src)
  save_hf(model, params, str(tmp_path), json.load(open(os.path.join(src, "config.json"))))
  ref = np.load(os.path.join(src, "reference.npz"))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  with torch.no_grad():
    logits = hf_model(torch.tensor(ref["tokens"], dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(logits, ref["logits"], atol=1e-5)


def _copy(tmp_path, family="olmoe"):
  dst = tmp_path / family
  shutil.copytree(os.path.join(FIXTURES, family), dst)
  return dst


def _edit_config(path, **changes):
  config = json.loads((path / "config.json").read_text())
  config.update(changes)
  (path / "config.json").write_text(json.dumps(config))


def test_bad_checkpoints_are_one_line_errors(tmp_path):
  def error(path):
    with pytest.raises(ValueError) as info:
      load_hf(str(path))
    assert "\n" not in str(info.value)
    return str(info.value)

  assert "has no config.json" in error(tmp_path)
  p = _copy(tmp_path)
  _edit_config(p, model_type="llama4")
  assert error(p) == ("model_type 'llama4' is not supported; supported: deepseek_v3, mixtral, "
                      "olmoe, qwen2_moe, qwen3_moe")
  _edit_config(p, model_type="olmoe", rope_parameters={"rope_type": "yarn", "factor": 4.0})
  assert error(p).startswith("config.json field rope_parameters has rope_type 'yarn'")
  _edit_config(p, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
               quantization_config={"quant_method": "fp8"})
  assert error(p).startswith("config.json field quantization_config={'quant_method': 'fp8'} is "
                             "not understood by the olmoe import")
  _edit_config(p, quantization_config=None)
  assert "quantization_config" in error(p)  # present, even as null: still named
  p = _copy(tmp_path / "b")
  _edit_config(p, clip_qkv=8.0)
  assert error(p).startswith("config.json field clip_qkv=8.0 is not supported")
  p = _copy(tmp_path / "c")
  _edit_config(p, intermediate_size=20)
  assert error(p) == (f"{p}: tensor model.layers.0.mlp.experts.0.gate_proj.weight gives "
                      "decoder/layers/block_0/moe/experts/w_gate_EDF the shape (4, 32, 24), but "
                      "the config needs (4, 32, 20)")


def test_an_unsupported_dtype_is_named(tmp_path):
  from moe_jax.interop.safetensors_io import write_file
  src = _copy(tmp_path)
  reader = TensorReader(str(src))
  tensors = {n: np.asarray(reader.get(n)) for n in reader.names()}
  tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int8)
  write_file(str(src / "model.safetensors"), tensors)
  with pytest.raises(ValueError, match=r"tensor model.norm.weight has dtype I8; supported: "
                                       r"F32, F16, BF16$"):
    load_hf(str(src))


def test_missing_and_extra_tensors_are_named(tmp_path):
  from safetensors.numpy import load_file, save_file
  for change in ("missing", "extra"):
    p = _copy(tmp_path / change)
    tensors = load_file(str(p / "model.safetensors"))
    if change == "missing":
      del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    else:
      tensors["model.layers.2.mlp.experts.4.up_proj.weight"] = np.zeros((24, 32), np.float32)
    save_file(tensors, str(p / "model.safetensors"))
    with pytest.raises(ValueError) as info:
      load_hf(str(p))
    want = ("tensor model.layers.2.mlp.experts.3.up_proj.weight is missing" if change == "missing"
            else "tensor model.layers.2.mlp.experts.4.up_proj.weight is not used")
    assert want in str(info.value) and "nothing was loaded" in str(info.value)


def test_a_bfloat16_checkpoint_imports_and_exports_bit_for_bit(tmp_path):
  import ml_dtypes

  from moe_jax.interop.safetensors_io import write_file
  src = _copy(tmp_path)  # olmoe
  reader = TensorReader(str(src))
  bf16 = {n: np.asarray(reader.get(n), np.float32).astype(ml_dtypes.bfloat16)
          for n in reader.names()}
  write_file(str(src / "model.safetensors"), bf16)
  _edit_config(src, dtype="bfloat16")
  model, variables = load_hf(str(src))
  ref = np.load(os.path.join(FIXTURES, "olmoe", "reference.npz"))
  logits = _logits(model, variables, ref["tokens"])  # float32 math on bf16-rounded weights
  assert 1e-4 < np.abs(logits - ref["logits"]).max() < 0.2
  save_hf(model, variables, str(tmp_path / "out"), json.loads((src / "config.json").read_text()))
  out = TensorReader(str(tmp_path / "out"))
  for name in bf16:
    assert out.dtype(name) == "BF16"
    np.testing.assert_array_equal(out.get(name).view(np.uint16), bf16[name].view(np.uint16))
