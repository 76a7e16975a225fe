"""Generation: cached decoding equals uncached full-sequence logits at every step (batched
prompts of different lengths, left-padded); greedy output equals transformers' greedy
output on the imported tiny models; sampling options; decode-time MoE routing."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import lm_tiny
from moe_jax.inference import Generator, SamplingConfig, decode_model_config
from moe_jax.interop.hf import load_hf
from moe_jax.models import build_model

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "interop",
                        "fixtures")


def _imported(family):
  path = os.path.join(FIXTURES, family)
  model, variables = load_hf(path)
  return model, variables, np.load(os.path.join(path, "reference.npz"))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_greedy_output_equals_transformers_greedy(family):
  model, variables, ref = _imported(family)
  prompt = ref["greedy_prompt"][0].tolist()
  want = ref["greedy"][0, len(prompt):].tolist()
  assert Generator(model, variables)([prompt], SamplingConfig(max_new_tokens=len(want)))[0] == want


def _uncached_logits(model, variables, sequences):
  module = build_model(decode_model_config(model))
  return np.asarray(module.apply(variables, jnp.asarray(sequences, jnp.int32),
                                 method=module.logits))


def _tiny_lm():
  """lm_tiny's own model (einsum dispatch with capacity in training), random weights."""
  c = lm_tiny.get_config("smoke")
  model = {k: v for k, v in c.model.to_dict().items()}
  model["vocab_size"] = 64
  module = build_model(decode_model_config(model))  # the same parameters
  variables = module.init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32),
                          method=module.logits)
  return model, dict(variables)


@pytest.mark.parametrize("which", ["qwen3_moe", "deepseek_v3", "lm_tiny"])
def test_cached_decoding_equals_uncached_logits_at_every_step(which):
  model, variables = (_imported(which)[:2] if which != "lm_tiny" else _tiny_lm())
  prompts = [[5, 9, 13], [7, 3, 11, 2, 8, 20, 4, 17, 6], [30]]  # left-padded to 16
  outs, logits = Generator(model, variables)(prompts, SamplingConfig(max_new_tokens=6),
                                             return_logits=True)
  assert logits.shape[:2] == (6, 3)
  # Every row unpadded on the left, no cache, in one call (right padding cannot reach
  # earlier positions of a causal model).
  sequences = [prompt + out for prompt, out in zip(prompts, outs)]
  width = max(map(len, sequences))
  full_all = _uncached_logits(model, variables, [s + [0] * (width - len(s)) for s in sequences])
  for b, prompt in enumerate(prompts):
    full = full_all[b]
    for t in range(len(outs[b])):
      np.testing.assert_allclose(logits[t, b], full[len(prompt) - 1 + t], atol=1e-4, rtol=0,
                                 err_msg=f"row {b} step {t}")


def test_sampling_options_and_stop_tokens():
  model, variables, ref = _imported("qwen3_moe")
  g = Generator(model, variables)
  prompts = [ref["greedy_prompt"][0].tolist(), [4, 5]]
  greedy = g(prompts, SamplingConfig(max_new_tokens=8))
  # Only the top token survives top_k=1 or a tiny top_p, whatever the temperature.
  assert g(prompts, SamplingConfig(temperature=1.5, top_k=1, max_new_tokens=8)) == greedy
  assert g(prompts, SamplingConfig(temperature=1.5, top_p=1e-6, max_new_tokens=8)) == greedy
  hot = SamplingConfig(temperature=5.0, max_new_tokens=8, seed=3)
  assert g(prompts, hot) == g(prompts, hot) != greedy  # seeded, and not greedy
  stop = greedy[0][2]
  stopped = g(prompts, SamplingConfig(max_new_tokens=8, stop_tokens=(stop,)))
  assert stopped[0] == greedy[0][:greedy[0].index(stop) + 1]
  streamed = []
  g(prompts, SamplingConfig(max_new_tokens=8), on_tokens=lambda ids: streamed.append(ids))
  assert [int(s[0]) for s in streamed] == greedy[0]
  # One compile per shape bucket: other prompts of the same bucket reuse the programs.
  g([[1, 2, 3], [9]], SamplingConfig(max_new_tokens=8))
  assert g._step._cache_size() == 1 and g._prefill._cache_size() == 1


def test_bad_sampling_settings_and_expert_choice_are_one_line():
  for bad, match in ((dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                     (dict(top_k=-2), "top_k"), (dict(max_new_tokens=0), "max_new_tokens")):
    with pytest.raises(ValueError, match=match):
      SamplingConfig(**bad)
  model = dict(_tiny_lm()[0])
  model["moe"] = dict(model["moe"], router=dict(name="expert_choice"))
  with pytest.raises(ValueError, match="expert-choice routing cannot decode token by token"):
    decode_model_config(model)
  assert decode_model_config(_tiny_lm()[0])["moe"]["dispatch"] == "sorted"  # was einsum
