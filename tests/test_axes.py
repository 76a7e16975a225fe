"""Every parameter of the shipped models names its axes with letters from one legend."""
import jax
import jax.numpy as jnp
import pytest

from moe_jax import axes, models
from moe_jax.parallel.partitioning import LETTER_AXES
from moe_jax.tasks import Task


def test_suffix_letters(monkeypatch):
  assert axes.suffix_letters("w_qkv_D3HQ") == "DHQ"
  assert axes.suffix_letters("kernel") == ""
  assert axes.unknown_letters("w_proj_DY") == []
  monkeypatch.delitem(axes.LEGEND, "Y")  # every letter has a meaning now: drop one
  assert axes.unknown_letters("w_proj_DY") == ["Y"]
  assert set(LETTER_AXES) <= set(axes.LEGEND)


@pytest.mark.parametrize("name", ["imp", "lm"])
def test_shipped_model_parameters_use_the_legend(name):
  moe = dict(num_experts=4, router=dict(name="top_k", k=2), expert_hidden_dim=8,
             num_shared_experts=1)
  cfg = dict(name=name, d_model=8, num_layers=2, num_heads=2, mlp_dim=16, moe_every=2, moe=moe,
             **({"causal": True} if name == "lm" else {"embed_dim": 4}))
  model = models.build_model(cfg)
  if name == "lm":
    task, batch = Task("t", "lm", "x", modalities=("tokens",)), {"tokens": jnp.ones((1, 5), int)}
  else:
    task = Task("t", "contrastive", "x", modalities=("image", "text"))
    batch = {"image": jnp.ones((2, 4, 4, 1)), "text": jnp.ones((2, 3), int)}
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, task=task))["params"]
  names = [str(getattr(p[-1], "key", p[-1])) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  suffixed = [n for n in names if axes.suffix_letters(n)]
  assert len(suffixed) >= 8, names  # the test sees the lettered parameters
  bad = {n: axes.unknown_letters(n) for n in names if axes.unknown_letters(n)}
  assert not bad, f"parameter suffixes outside moe_jax/axes.py LEGEND: {bad}"
