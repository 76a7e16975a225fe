"""Tokenizers, DropToken and the IMP / LM models' task paths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import models
from moe_jax.train.agd import Task
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


@pytest.mark.parametrize("rate,kept", [(0.33, 7), (0.37, 6), (0.25, 8), (0.0, 10), (0.99, 1)])
def test_drop_tokens_keeps_the_nearest_count_halves_up(rate, kept):
  # N=10: (1 - rate) * 10 = 6.7 -> 7, 6.3 -> 6, 7.5 -> 8, 10 -> 10, 0.1 -> at least 1.
  tokens = jnp.arange(10, dtype=jnp.float32).reshape(1, 10, 1)
  out, mask = drop_tokens(jax.random.key(0), tokens, jnp.ones((1, 10), bool), rate)
  assert out.shape == (1, kept, 1) and mask.shape == (1, kept)


def _batch(key, **shapes):
  return {k: jax.random.uniform(jax.random.fold_in(key, i), s) for i, (k, s) in enumerate(
      shapes.items())}


def test_imp_classify_any_resolution_and_drop_token():
  model = models.build_model(IMP)
  task = Task("img", "classify", "x", modalities=("image",), num_classes=10,
              drop_rates=(("image", 0.5),))
  batch = {**_batch(jax.random.key(0), image=(4, 8, 8, 1)), "label": jnp.arange(4)}
  params = model.init(jax.random.key(1), batch, task=task)["params"]
  (loss, metrics), st = model.apply({"params": params}, batch, task=task, deterministic=False,
                                    rngs={"droptoken": jax.random.key(2)},
                                    capture_intermediates=True, mutable=["intermediates"])
  logits = np.asarray(st["intermediates"]["classifier_img"]["__call__"][0], np.float64)
  np.testing.assert_allclose(loss, _np_cross_entropy(logits, np.arange(4)), rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(logits.argmax(-1) == np.arange(4)))
  # The same parameters take a 12x12 resolution (per-axis position tables).
  big = {**_batch(jax.random.key(3), image=(4, 12, 12, 1)), "label": jnp.arange(4)}
  loss_big, _ = model.apply({"params": params}, big, task=task)
  assert np.isfinite(loss_big)
  # A resize task reuses them too.
  resized = Task("img16", "classify", "x", modalities=("image",), num_classes=10, head="img",
                 image_size=16)
  assert np.isfinite(model.apply({"params": params}, batch, task=resized)[0])


def _np_cross_entropy(logits, labels):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  return np.mean(lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0])


def _np_unit(z):
  z = np.asarray(z, np.float64)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _np_info_nce(z_a, z_b, scale):
  """Symmetric InfoNCE (CLIP): in-batch negatives, matching pairs on the diagonal."""
  logits = scale * _np_unit(z_a) @ _np_unit(z_b).T
  labels = np.arange(len(logits))
  return 0.5 * (_np_cross_entropy(logits, labels) + _np_cross_entropy(logits.T, labels))


CONTRAST = Task("it", "contrastive", "x", modalities=("image", "text"),
                class_names=("zero", "one", "two"), prompt_template="a {}")


def _contrast_batch(text):
  return {**_batch(jax.random.key(0), image=(4, 8, 8, 1)), "text": text,
          "label": jnp.array([0, 1, 2, 0])}


def _captured(model, params, batch, **kw):
  out, st = model.apply({"params": params}, batch, task=CONTRAST, capture_intermediates=True,
                        mutable=["intermediates"], **kw)
  emb = lambda side: st["intermediates"][f"contrast_image_text_{side}"]["__call__"][0]
  return out, emb("image"), emb("text")


def test_imp_contrastive_loss_is_symmetric_info_nce_at_the_learned_scale():
  model = models.build_model(IMP)
  batch = _contrast_batch(jax.random.randint(jax.random.key(5), (4, 6), 1, 257))
  params = model.init(jax.random.key(1), batch, task=CONTRAST)["params"]
  # At init the scale is 1 / init_temperature = 10; then 3; then 1000, clipped to 100.
  for log_scale, scale in ((None, 10.0), (np.log(3.0), 3.0), (np.log(1000.0), 100.0)):
    if log_scale is not None:
      params = {**params, "contrast_image_text_log_scale": jnp.float32(log_scale)}
    (loss, metrics), z_a, z_b = _captured(model, params, batch)
    np.testing.assert_allclose(loss, _np_info_nce(z_a, z_b, scale), rtol=1e-5)
    np.testing.assert_allclose(metrics["temperature"], 1.0 / scale, rtol=1e-5)
    sim = _np_unit(z_a) @ _np_unit(z_b).T
    np.testing.assert_allclose(metrics["image_to_text_accuracy"],
                               np.mean(sim.argmax(1) == np.arange(4)))
    np.testing.assert_allclose(metrics["text_to_image_accuracy"],
                               np.mean(sim.argmax(0) == np.arange(4)))


def test_imp_zero_shot_picks_the_nearest_class_prompt():
  model = models.build_model(IMP)
  batch = _contrast_batch(jax.random.randint(jax.random.key(5), (4, 6), 1, 257))
  params = model.init(jax.random.key(1), batch, task=CONTRAST)["params"]
  (_, zs), z_query, z_prompts = _captured(model, params, batch, zero_shot=True)
  assert z_prompts.shape[0] == 3  # one prompt per class name
  guess = (_np_unit(z_query) @ _np_unit(z_prompts).T).argmax(1)
  np.testing.assert_allclose(zs["zero_shot_accuracy"], np.mean(guess == np.array([0, 1, 2, 0])))


def test_imp_zero_shot_takes_the_tasks_prompt_ids():
  import dataclasses

  model = models.build_model(IMP)
  batch = _contrast_batch(jax.random.randint(jax.random.key(5), (4, 6), 1, 257))
  params = model.init(jax.random.key(1), batch, task=CONTRAST)["params"]
  # Byte ids of the prompts ("a zero", ...; id = byte + 1) given as prompt_ids: the same
  # prompt embeddings as the byte path (truncated to the batch's text length, 6).
  byte_ids = tuple(tuple(b + 1 for b in f"a {c}".encode()) for c in CONTRAST.class_names)
  same = dataclasses.replace(CONTRAST, prompt_ids=byte_ids)
  other = dataclasses.replace(CONTRAST, prompt_ids=((5, 6), (7,), (8, 9, 10)))
  run = lambda task: model.apply({"params": params}, batch, task=task, zero_shot=True,
                                 capture_intermediates=True, mutable=["intermediates"])
  prompts = lambda task: run(task)[1]["intermediates"]["contrast_image_text_text"]["__call__"][0]
  np.testing.assert_allclose(prompts(same), prompts(CONTRAST), rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(prompts(other)) - np.asarray(prompts(CONTRAST))).max() > 1e-3


def test_imp_padding_captions_further_changes_nothing():
  """The same captions padded to 8 and to 13 bytes: same loss, embeddings and zero-shot.

  Padding must stay out of attention (key mask), pooling (masked mean) and routing
  (IMP's expert choice counts capacity from real tokens).
  """
  model = models.build_model(IMP)
  lengths = [3, 6, 2, 5]
  ids = np.asarray(jax.random.randint(jax.random.key(5), (4, 6), 1, 257))
  padded = lambda L: jnp.asarray([list(r[:n]) + [0] * (L - n) for r, n in zip(ids, lengths)])
  params = model.init(jax.random.key(1), _contrast_batch(padded(8)), task=CONTRAST)["params"]
  (loss8, _), _, z8 = _captured(model, params, _contrast_batch(padded(8)))
  (loss13, _), _, z13 = _captured(model, params, _contrast_batch(padded(13)))
  np.testing.assert_allclose(z8, z13, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(loss8, loss13, rtol=1e-5)
  (_, zs8), _, p8 = _captured(model, params, _contrast_batch(padded(8)), zero_shot=True)
  (_, zs13), _, p13 = _captured(model, params, _contrast_batch(padded(13)), zero_shot=True)
  np.testing.assert_allclose(p8, p13, rtol=1e-4, atol=1e-5)
  assert float(zs8["zero_shot_accuracy"]) == float(zs13["zero_shot_accuracy"])


def _classifier_logits(model, params, batch, task):
  (loss, metrics), st = model.apply({"params": params}, batch, task=task,
                                    capture_intermediates=True, mutable=["intermediates"])
  logits = st["intermediates"][f"classifier_{task.head_name}"]["__call__"][0]
  return loss, metrics, np.asarray(logits, np.float64)


def test_imp_padding_audio_clips_further_changes_nothing():
  """Clips of 900 and 1500 samples padded to 2048 and to 4096 samples (15 and 31 log-mel
  frames, neither a multiple of the 4-frame patch): the same logits. The waveform mask
  becomes a frame mask (log_mel: a frame is real when it lies inside the clip: 6 and 10
  frames), then a token mask (the audio tokenizer)."""
  from moe_jax.data.transforms import build_transforms

  task = Task("snd", "classify", "x", modalities=("audio",), num_classes=3)
  rng = np.random.default_rng(0)
  clips = [rng.integers(-8000, 8000, n).astype(np.int16) for n in (900, 1500)]

  def batch(samples):
    pipe = build_transforms(f"audio_to_float|pad_crop(samples={samples})|log_mel(sample_rate="
                            "8000, n_fft=256, hop=128, num_mels=16)|standardize", training=False)
    examples = [pipe({"audio": c}, None) for c in clips]
    out = {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}
    return {**out, "label": jnp.array([0, 2])}

  short, long = batch(2048), batch(4096)
  assert short["audio"].shape == (2, 15, 16) and long["audio"].shape == (2, 31, 16)
  assert short["audio_mask"].sum(1).tolist() == long["audio_mask"].sum(1).tolist() == [6, 10]
  model = models.build_model(IMP)
  params = model.init(jax.random.key(1), short, task=task)["params"]
  loss_s, _, logits_s = _classifier_logits(model, params, short, task)
  loss_l, _, logits_l = _classifier_logits(model, params, long, task)
  np.testing.assert_allclose(logits_s, logits_l, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(loss_s, loss_l, rtol=1e-5)
  # Without the mask the padding does change the output (the test can fail).
  no_mask = lambda b: {k: v for k, v in b.items() if k != "audio_mask"}
  _, _, raw_s = _classifier_logits(model, params, no_mask(short), task)
  _, _, raw_l = _classifier_logits(model, params, no_mask(long), task)
  assert np.abs(raw_s - raw_l).max() > 1e-3


def test_imp_eval_fill_changes_nothing_for_the_real_examples():
  """An eval batch of 4 whose last 2 rows are fill ("valid" False) gives the metrics of
  the 2 real examples alone, for classification and contrastive tasks."""
  model = models.build_model(IMP)
  classify = Task("img", "classify", "x", modalities=("image",), num_classes=3)
  full = _contrast_batch(jax.random.randint(jax.random.key(5), (4, 6), 1, 257))
  full["label"] = jnp.array([0, 2, 1, 1])
  params = model.init(jax.random.key(1), full, task=CONTRAST)["params"]
  params = {**params, **model.init(jax.random.key(1), full, task=classify)["params"]}
  real = jax.tree.map(lambda x: x[:2], full)
  filled = {**full, "valid": jnp.array([True, True, False, False])}
  for task in (classify, CONTRAST):
    (loss_real, m_real) = model.apply({"params": params}, real, task=task)
    (loss_fill, m_fill) = model.apply({"params": params}, filled, task=task)
    (loss_all, _) = model.apply({"params": params}, full, task=task)
    np.testing.assert_allclose(loss_fill, loss_real, rtol=1e-5)
    assert abs(float(loss_all) - float(loss_real)) > 1e-4  # the fill would count otherwise
    for k in m_real:
      np.testing.assert_allclose(m_fill[k], m_real[k], rtol=1e-5, err_msg=k)


def test_imp_says_a_waveform_needs_log_mel():
  model = models.build_model(IMP)
  task = Task("snd", "classify", "x", modalities=("audio",), num_classes=3)
  with pytest.raises(ValueError, match=r"task 'snd': audio must be a spectrogram \[batch, "
                                       r"frames, mels\], got shape \(2, 4000\); .*log_mel"):
    model.init(jax.random.key(0), {"audio": jnp.ones((2, 4000)), "label": jnp.zeros(2, int)},
               task=task)


def test_imp_reports_missing_modality():
  model = models.build_model(IMP)
  task = Task("vid", "classify", "x", modalities=("video",), num_classes=3)
  with pytest.raises(ValueError, match=r"task 'vid' reads 'video' but the batch has \['image'"):
    model.init(jax.random.key(0), {"image": jnp.ones((2, 8, 8, 1)), "label": jnp.zeros(2, int)},
               task=task)


LM = dict(name="lm", d_model=16, num_layers=2, num_heads=2, mlp_dim=32, causal=True,
          moe=dict(num_experts=4, router=dict(name="top_k", k=2), expert_hidden_dim=16,
                   dispatch="sorted"), moe_every=2)
LM_TASK = Task("lm", "lm", "x", modalities=("tokens",))


def _lm_logits(model, params, tokens):
  (loss, metrics), st = model.apply({"params": params}, {"tokens": tokens}, task=LM_TASK,
                                    capture_intermediates=True, mutable=["intermediates"])
  return loss, metrics, np.asarray(st["intermediates"]["lm_head"]["__call__"][0], np.float64)


def test_lm_loss_is_next_byte_cross_entropy_with_padding_weighted_zero():
  model = models.build_model(LM)
  tokens = np.array(jax.random.randint(jax.random.key(0), (2, 9), 1, 257))
  tokens[1, 6:] = 0  # row 1 is 6 bytes then padding
  params = model.init(jax.random.key(1), {"tokens": jnp.asarray(tokens)}, task=LM_TASK)["params"]
  loss, metrics, logits = _lm_logits(model, params, jnp.asarray(tokens))
  assert logits.shape == (2, 8, 257)
  # Position s predicts byte s + 1; targets equal to 0 (padding) weigh nothing.
  targets = tokens[:, 1:]
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  w = (targets != 0).astype(np.float64)
  assert w.sum() == 8 + 5
  np.testing.assert_allclose(loss, (nll * w).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"],
                             ((logits.argmax(-1) == targets) * w).sum() / w.sum(), rtol=1e-6)
  np.testing.assert_allclose(metrics["bits_per_byte"], loss / np.log(2.0), rtol=1e-6)
  assert abs(float(loss) - np.log(257)) < 1.0  # near uniform at init


def test_lm_logits_are_causal():
  """Changing byte j changes the logits at input positions >= j and none before."""
  model = models.build_model(LM)
  tokens = np.array(jax.random.randint(jax.random.key(0), (1, 9), 1, 257))
  params = model.init(jax.random.key(1), {"tokens": jnp.asarray(tokens)}, task=LM_TASK)["params"]
  _, _, before = _lm_logits(model, params, jnp.asarray(tokens))
  j = 4
  tokens[0, j] = tokens[0, j] % 256 + 1
  _, _, after = _lm_logits(model, params, jnp.asarray(tokens))
  np.testing.assert_allclose(after[0, :j], before[0, :j], rtol=1e-5, atol=1e-6)
  assert np.all(np.abs(after[0, j:] - before[0, j:]).max(-1) > 1e-4)


def test_build_model_names_unknown_keys():
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_layer'\] in config.model; valid"):
    models.build_model({**IMP, "num_layer": 2})
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_expert'\] in config.model.moe"):
    models.build_model({**IMP, "moe": {"num_expert": 4}})
  with pytest.raises(ValueError, match=r"model.name='gpt' is not supported"):
    models.build_model({**IMP, "name": "gpt"})


def test_switching_a_component_by_name_drops_the_first_ones_exposed_defaults():
  # The shipped configs expose the named router's / layer's / attention's options at their
  # defaults (for --config.model.moe.router.jitter=...); switching the name on the command
  # line leaves them behind. Defaults of another component go; a set value stays and is
  # refused in one line; None placeholders of the component's own options go.
  from experiments.configs import lm_tiny
  c = lm_tiny.get_config("smoke")
  assert c.model.moe.router.k == 2 and c.model.attention.name == "mha"
  c.model.moe.router.name = "expert_choice"
  c.model.moe.layer = {"name": "residual", "mlp_hidden_dim": None}
  c.model.attention = {"name": "moh", "k": 1, "shared_heads": None}
  stack = models.stack_config(models.build_model(c.model))
  assert stack.moe.router.kwargs() == {"jitter": 0.0}  # top_k's k, score, ... dropped
  assert stack.moe.layer.kwargs() == {} and stack.attention.kwargs() == {"k": 1}
  c.model.moe.router.k = 3  # not expert choice's option, and not a default anywhere
  with pytest.raises(ValueError, match=r"^unknown option\(s\) \['k'\] for router "
                                       r"'expert_choice'; valid: jitter$"):
    models.build_model(c.model)
