"""Registries: a new router is one file; unknown names list the registered ones."""
import dataclasses
import importlib.util
import sys

import jax
import numpy as np
import pytest

from moe_jax import DISPATCHERS, ROUTERS, MoEConfig, MoELayer
from moe_jax.registry import Registry

TOY_ROUTER = '''
"""A toy router: every token to expert `expert` with weight `gate`."""
import flax.linen as nn
import jax.numpy as jnp

from moe_jax import validation as V
from moe_jax.nn.routing import ROUTERS, RoutingDecision


@ROUTERS.register("toy_constant")
class ToyConstantRouter(nn.Module):
  num_experts: int
  expert: int = 0
  gate: float = 1.0

  def __post_init__(self):
    V.check_int_range("expert", self.expert, lo=0, hi=self.num_experts - 1)
    super().__post_init__()

  @nn.compact
  def __call__(self, x_TD, context=None, *, deterministic=True, token_mask_T=None):
    T = x_TD.shape[0]
    zero = jnp.zeros((), jnp.float32)
    return RoutingDecision(
        expert_index_TK=jnp.full((T, 1), self.expert, jnp.int32),
        weight_TK=jnp.full((T, 1), self.gate, jnp.float32),
        aux={"load_balance_loss": zero, "z_loss": zero, "dropped_fraction": zero,
             "router_entropy": zero,
             "expert_load_E": jnp.zeros((self.num_experts,)).at[self.expert].set(1.0)})
'''


def test_a_router_added_in_one_file_works_from_config(tmp_path):
  path = tmp_path / "toy_constant.py"
  path.write_text(TOY_ROUTER)
  spec = importlib.util.spec_from_file_location("toy_constant_router", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  assert "toy_constant" in ROUTERS.names()
  with pytest.raises(ValueError, match=r"expert=7 is out of range"):
    MoEConfig(num_experts=4, router=dict(name="toy_constant", expert=7))
  cfg = MoEConfig(num_experts=4, expert_hidden_dim=8, dispatch="sorted",
                  router=dict(name="toy_constant", expert=2, gate=0.5))
  layer = MoELayer(cfg)
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  params = layer.init(jax.random.key(1), x)["params"]
  y = layer.apply({"params": params}, x)
  ex = params["experts"]
  h = x.reshape(-1, 8)
  want = 0.5 * ((jax.nn.silu(h @ ex["w_gate_EDF"][2]) * (h @ ex["w_up_EDF"][2]))
                @ ex["w_down_EFD"][2])
  np.testing.assert_allclose(y.reshape(-1, 8), want, rtol=1e-5, atol=1e-6)


def test_registry_imports_a_named_module_on_first_use(tmp_path, monkeypatch):
  pkg = tmp_path / "toy_pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "shout.py").write_text("from toy_pkg_registry import REG\n"
                                "@REG.register('shout')\ndef shout():\n  return 'HI'\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  reg = Registry("toy", package="toy_pkg")
  registry_module = type(sys)("toy_pkg_registry")
  registry_module.REG = reg
  monkeypatch.setitem(sys.modules, "toy_pkg_registry", registry_module)
  assert reg.get("shout")() == "HI"
  with pytest.raises(ValueError, match=r"toy='whisper' is not registered; registered: 'shout'"):
    reg.get("whisper")


def test_builtin_registries_and_their_metadata():
  assert ROUTERS.names()[:2] == ("top_k", "expert_choice")
  assert DISPATCHERS.names() == ("einsum", "sorted", "dense", "pallas", "tiled", "auto")
  clean = [n for n in DISPATCHERS.names() if DISPATCHERS.meta(n)["vma_clean"]]
  assert clean == ["einsum", "sorted", "dense", "tiled"]
  assert [n for n in DISPATCHERS.names() if not DISPATCHERS.meta(n)["dropless"]] == ["einsum"]


def test_a_layer_added_in_one_file_fills_the_moe_positions_of_a_stack():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from moe_jax.config import TransformerConfig  # pylint: disable=import-outside-toplevel
  from moe_jax.nn.layers import MOE_LAYERS  # pylint: disable=import-outside-toplevel
  from moe_jax.nn.transformer import TransformerStack  # pylint: disable=import-outside-toplevel

  @MOE_LAYERS.register("toy_scale")
  class ToyScale(nn.Module):  # pylint: disable=unused-variable
    config: MoEConfig
    dtype: object = None
    param_dtype: object = None
    factor: float = 2.0

    @staticmethod
    def check_options(factor: float = 2.0):
      if factor <= 0:
        raise ValueError(f"factor={factor} must be > 0")

    def __call__(self, x, *, deterministic=True, context=None, token_mask=None):
      return self.factor * x

  with pytest.raises(ValueError, match=r"layer='nope' is not registered; registered: 'moe'"):
    MoEConfig(layer="nope")
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['size'\] for layer 'toy_scale'; "
                                       r"valid: factor"):
    MoEConfig(layer=dict(name="toy_scale", size=3))
  with pytest.raises(ValueError, match=r"factor=-1 must be > 0"):
    MoEConfig(layer=dict(name="toy_scale", factor=-1))
  cfg = TransformerConfig(num_layers=2, d_model=8, num_heads=2, mlp_dim=16, moe_layers=(0,),
                          moe=MoEConfig(num_experts=2, layer=dict(name="toy_scale", factor=3.0)))
  x = jax.random.normal(jax.random.key(0), (1, 3, 8))
  params = TransformerStack(cfg).init(jax.random.key(1), x)["params"]
  assert "moe" not in params["layers"]["block_0"]  # the toy layer has no parameters
  assert "mlp" in params["layers"]["block_1"]
  outputs = []
  for factor in (1.0, 3.0):
    cfg_f = dataclasses.replace(cfg, moe=MoEConfig(num_experts=2,
                                                   layer=dict(name="toy_scale", factor=factor)))
    outputs.append(TransformerStack(cfg_f).apply({"params": params}, x))
  assert np.abs(outputs[1] - outputs[0]).max() > 1e-3  # the option reached the layer


def test_an_unknown_name_lists_components_not_imported_yet():
  for kwargs, names in ((dict(layer="softmoe"), ("'soft_moe'", "'residual'", "'lora_moe'")),
                        (dict(router="dense2sparse"), ("'dense_to_sparse'", "'conditioned'"))):
    with pytest.raises(ValueError, match="is not registered; registered: ") as e:
      MoEConfig(**kwargs)
    assert all(n in str(e.value) for n in names), str(e.value)
