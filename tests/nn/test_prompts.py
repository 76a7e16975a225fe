"""Mixture of soft prompts (SMoP) in the IMP encoder against a numpy reference."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import models
from moe_jax.models.imp import IMPConfig
from moe_jax.models.tokenizers import TextTokenizer
from moe_jax.nn import losses
from moe_jax.nn.prompts import PromptMixConfig, PromptMixture
from moe_jax.nn.transformer import TransformerStack
from moe_jax.tasks import Task


def reference_mix(params, tokens_BSD, mask_BS, k):
  """SMoP by hand: masked mean -> softmax router -> the k most probable prompts, each times
  its probability, summed; and alpha-free load balance E * sum_e mean_b(p_e) * f_e."""
  x = np.asarray(tokens_BSD, np.float64)
  w = np.asarray(mask_BS, np.float64)
  pooled = (x * w[..., None]).sum(1) / w.sum(1, keepdims=True)
  logits = pooled @ np.asarray(params["router_DE"], np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  P = np.asarray(params["prompts_ESD"], np.float64)
  E = P.shape[0]
  mix, counts = [], np.zeros(E)
  for b in range(x.shape[0]):
    top = np.argsort(-p[b])[:k]
    counts[top] += 1
    mix.append(sum(p[b, e] * P[e] for e in top))
  return np.stack(mix), E * np.sum(p.mean(0) * counts / counts.sum())


def test_mixed_prompt_and_balance_loss_match_the_reference():
  cfg = PromptMixConfig(num_prompts=3, length=2, k=2, load_balance_weight=0.5)
  x = jax.random.normal(jax.random.key(0), (4, 5, 6))
  mask = jnp.array([[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], bool)
  module = PromptMixture(cfg)
  params = module.init(jax.random.key(1), x, mask)["params"]
  out, coll = module.apply({"params": params}, x, mask, mutable=[losses.AUX_LOSS_COLLECTION])
  want, balance = reference_mix(params, x, mask, k=2)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.sum_aux_losses(coll), 0.5 * balance, rtol=1e-5)
  # the router learns through the probabilities that weight the prompts
  g = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x, mask) ** 2))(params)
  assert np.abs(g["router_DE"]).max() > 0


def test_imp_prepends_the_mix_to_the_encoder_input_and_pools_only_the_input():
  model = models.build_model(dict(name="imp", d_model=8, num_layers=2, num_heads=2, mlp_dim=16,
                                  embed_dim=4, moe_last=1,
                                  moe=dict(num_experts=4, expert_hidden_dim=8, dispatch="sorted"),
                                  prompts=dict(num_prompts=3, length=2, k=2)))
  task = Task("t", "contrastive", "x", modalities=("image", "text"))
  batch = {"image": jax.random.normal(jax.random.key(0), (3, 4, 4, 1)),
           "text": jnp.array([[5, 6, 7, 0], [8, 9, 0, 0], [3, 4, 5, 6]]),
           "text_mask": jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)}
  params = model.init(jax.random.key(1), batch, task=task)["params"]
  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, TextTokenizer):
      seen["tokens"] = out[0]
    elif isinstance(context.module, TransformerStack):
      seen.setdefault("stack", []).append((args[0], kwargs.get("mask_BS"), out))
    elif isinstance(context.module, nn.Dense) and context.module.name == "output_text":
      seen["pooled"] = args[0]
    return out

  with nn.intercept_methods(record):
    model.apply({"params": params}, batch, task=task)
  x_in, mask_in, h = seen["stack"][-1]  # the text call (image first, then text)
  want, _ = reference_mix(params["prompts"], seen["tokens"], batch["text_mask"], k=2)
  np.testing.assert_allclose(x_in[:, :2], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(x_in[:, 2:], seen["tokens"])
  np.testing.assert_array_equal(mask_in[:, :2], True)
  m = np.asarray(batch["text_mask"], np.float64)[..., None]
  pooled = (np.asarray(h[:, 2:], np.float64) * m).sum(1) / m.sum(1)
  np.testing.assert_allclose(seen["pooled"], pooled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prompts, message", [
    (dict(num_prompts=2, k=3), "prompts.k=3 is out of range"),
    (dict(length=0), "prompts.length=0 is out of range"),
    (dict(num_prompt=2), r"unknown key\(s\) \['num_prompt'\] in prompts"),
    (dict(load_balance_weight=-1.0), "prompts.load_balance_weight=-1.0 must be"),
])
def test_bad_prompt_settings_are_one_line_errors(prompts, message):
  with pytest.raises(ValueError, match=message):
    models.build_model(dict(name="imp", d_model=8, num_layers=1, num_heads=2, prompts=prompts))
  assert IMPConfig(encoder=None, prompts=None).prompts is None
