"""Tokenizers, DropToken and the IMP / LM models' task paths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import models
from moe_jax.agd import Task
from moe_jax.models.tokenizers import drop_tokens, patchify

MOE = dict(num_experts=4, router="expert_choice", capacity_factor=1.0, dispatch="einsum",
           expert_hidden_dim=16)
IMP = dict(name="imp", d_model=16, num_layers=2, num_heads=2, mlp_dim=32, moe_last=1, moe=MOE,
           patch_image=(2, 2), patch_video=(2, 2, 2), patch_audio=(4, 4), embed_dim=8)


def test_patchify_matches_a_loop():
  x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  tokens, grid = patchify(jnp.asarray(x), (2, 3))
  assert grid == (2, 2) and tokens.shape == (2, 4, 2 * 3 * 3)
  for b in range(2):
    for i in range(2):
      for j in range(2):
        want = x[b, 2 * i:2 * i + 2, 3 * j:3 * j + 3, :].reshape(-1)
        np.testing.assert_array_equal(tokens[b, i * 2 + j], want)


def test_patchify_rejects_indivisible_shapes():
  with pytest.raises(ValueError, match=r"not divisible by patch=\(3, 3\)"):
    patchify(jnp.ones((1, 8, 8, 1)), (3, 3))


def test_drop_tokens_keeps_a_sorted_subset_per_example():
  tokens = jnp.arange(2 * 10, dtype=jnp.float32).reshape(2, 10, 1)
  kept, mask = drop_tokens(jax.random.key(0), tokens, None, 0.3)
  assert kept.shape == (2, 7, 1) and mask is None
  for b in range(2):
    values = np.asarray(kept[b, :, 0])
    assert np.all(np.diff(values) > 0)  # original order kept
    assert set(values) <= set(np.asarray(tokens[b, :, 0]))
  assert not np.array_equal(kept[0, :, 0] - 0, kept[1, :, 0] - 10)  # drawn per example


def _batch(key, **shapes):
  return {k: jax.random.uniform(jax.random.fold_in(key, i), s) for i, (k, s) in enumerate(
      shapes.items())}


def test_imp_classify_any_resolution_and_drop_token():
  model = models.build_model(IMP)
  task = Task("img", "classify", "x", modalities=("image",), num_classes=10,
              drop_rates=(("image", 0.5),))
  batch = {**_batch(jax.random.key(0), image=(4, 8, 8, 1)), "label": jnp.arange(4)}
  params = model.init(jax.random.key(1), batch, task=task)["params"]
  loss, metrics = model.apply({"params": params}, batch, task=task, deterministic=False,
                              rngs={"droptoken": jax.random.key(2)})
  assert np.isfinite(loss) and 0 <= metrics["accuracy"] <= 1
  # The same parameters take a 12x12 resolution (per-axis position tables).
  big = {**_batch(jax.random.key(3), image=(4, 12, 12, 1)), "label": jnp.arange(4)}
  loss_big, _ = model.apply({"params": params}, big, task=task)
  assert np.isfinite(loss_big)
  # A resize task reuses them too.
  resized = Task("img16", "classify", "x", modalities=("image",), num_classes=10, head="img",
                 image_size=16)
  assert np.isfinite(model.apply({"params": params}, batch, task=resized)[0])


def test_imp_contrastive_and_zero_shot():
  model = models.build_model(IMP)
  task = Task("it", "contrastive", "x", modalities=("image", "text"),
              class_names=("zero", "one", "two"), prompt_template="a {}")
  text = jax.random.randint(jax.random.key(5), (4, 6), 1, 257)
  batch = {**_batch(jax.random.key(0), image=(4, 8, 8, 1)), "text": text,
           "label": jnp.array([0, 1, 2, 0])}
  params = model.init(jax.random.key(1), batch, task=task)["params"]
  loss, metrics = model.apply({"params": params}, batch, task=task)
  assert np.isfinite(loss) and float(loss) > 0
  np.testing.assert_allclose(metrics["temperature"], 0.1, rtol=1e-5)  # IMPConfig default
  assert set(metrics) >= {"image_to_text_accuracy", "text_to_image_accuracy", "temperature"}
  _, zs = model.apply({"params": params}, batch, task=task, zero_shot=True)
  assert 0 <= float(zs["zero_shot_accuracy"]) <= 1


def test_imp_reports_missing_modality():
  model = models.build_model(IMP)
  task = Task("vid", "classify", "x", modalities=("video",), num_classes=3)
  with pytest.raises(ValueError, match=r"task 'vid' reads 'video' but the batch has \['image'"):
    model.init(jax.random.key(0), {"image": jnp.ones((2, 8, 8, 1)), "label": jnp.zeros(2, int)},
               task=task)


def test_lm_loss_starts_near_uniform_and_is_causal():
  cfg = dict(name="lm", d_model=16, num_layers=2, num_heads=2, mlp_dim=32, causal=True,
             moe=dict(num_experts=4, k=2, expert_hidden_dim=16, dispatch="sorted"), moe_every=2)
  model = models.build_model(cfg)
  task = Task("lm", "lm", "x", modalities=("tokens",))
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 1, 257)
  params = model.init(jax.random.key(1), {"tokens": tokens}, task=task)["params"]
  loss, _ = model.apply({"params": params}, {"tokens": tokens}, task=task)
  assert abs(float(loss) - np.log(257)) < 1.0


def test_build_model_names_unknown_keys():
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_layer'\] in config.model; valid"):
    models.build_model({**IMP, "num_layer": 2})
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['experts'\] in config.model.moe"):
    models.build_model({**IMP, "moe": {"experts": 4}})
  with pytest.raises(ValueError, match=r"model.name='gpt' is not supported"):
    models.build_model({**IMP, "name": "gpt"})
