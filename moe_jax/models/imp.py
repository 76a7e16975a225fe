"""IMP: one shared MoE encoder for image, video, audio and text (Akbari et al. 2023).

Axis letters: B batch, S tokens per example, D model dim (contrastive embeddings:
embed_dim wide).

Per modality: a tokenizer (patches / tubelets / spectrogram patches / bytes) with
per-axis position embeddings, and an output projection after the shared encoder.
Heads: one classifier per dataset (`Task.head_name`) and, per modality pair, two
contrastive projections with a learnable temperature (symmetric InfoNCE with
in-batch negatives). Zero-shot classification compares a query's embedding with
the embeddings of text prompts made from the class names.

`IMPModel(batch, task=..., deterministic=...) -> (loss, metrics)`; the DropToken
rng is "droptoken".
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.nn import losses
from moe_jax.nn.context import Context
from moe_jax.nn.prompts import PromptMixConfig, PromptMixture
from moe_jax.tasks import MODALITIES, VALID, Task
from moe_jax.config import TransformerConfig
from moe_jax.tokenizer import ByteTokenizer
from moe_jax.models.tokenizers import PatchTokenizer, TextTokenizer, drop_tokens
from moe_jax.nn.transformer import TransformerStack


@dataclasses.dataclass(frozen=True)
class IMPConfig:
  encoder: TransformerConfig
  patch_image: tuple[int, ...] = (2, 2)
  patch_video: tuple[int, ...] = (2, 2, 2)
  patch_audio: tuple[int, ...] = (4, 4)
  vocab_size: int = ByteTokenizer.vocab_size
  max_positions: int = 64
  embed_dim: int = 64
  init_temperature: float = 0.1
  # A routed mixture of soft prompts prepended to every input (moe_jax/nn/prompts.py):
  # None, or dict(num_prompts=E, length=S, k=..., load_balance_weight=...).
  prompts: Any = None

  def __post_init__(self):
    object.__setattr__(self, "prompts", PromptMixConfig.parse(self.prompts))


def _masked_mean(x_BSD: jax.Array, mask_BS: jax.Array | None) -> jax.Array:
  if mask_BS is None:
    return x_BSD.mean(axis=1)
  w = mask_BS.astype(x_BSD.dtype)[:, :, None]
  return (x_BSD * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


def _normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _accuracy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None
              ) -> jax.Array:
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  if weights is None:
    return correct.mean()
  return jnp.sum(correct * weights) / jnp.maximum(weights.sum(), 1.0)


class IMPModel(nn.Module):
  """Multimodal MoE encoder with per-task heads; see the module docstring."""

  config: IMPConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _dense(self, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def _tokenize(self, modality: str, x: jax.Array, mask: jax.Array | None, task: Task):
    """Input -> (tokens [B, S, D], mask [B, S] or None). `mask` is the input's padding
    mask: text [B, L] per token, audio [B, frames] per spectrogram frame."""
    cfg = self.config
    if modality == "text":
      tokens, ids_mask = TextTokenizer(cfg.vocab_size, cfg.encoder.d_model,
                                       max(cfg.max_positions, 256), self.dtype, self.param_dtype,
                                       name="tokenizer_text")(x)
      return tokens, ids_mask if mask is None else mask.astype(bool)
    if modality in ("image", "video") and task.image_size:
      size = task.image_size
      x = jax.image.resize(x.astype(jnp.float32), x.shape[:-3] + (size, size, x.shape[-1]),
                           "bilinear")
    patch = {"image": cfg.patch_image, "video": cfg.patch_video, "audio": cfg.patch_audio}
    if modality not in patch:
      raise ValueError(f"IMPModel has no tokenizer for modality {modality!r}; "
                       f"allowed: image, video, audio, text")
    if modality == "audio" and x.ndim != 3:
      raise ValueError(f"task {task.name!r}: audio must be a spectrogram [batch, frames, mels], "
                       f"got shape {tuple(x.shape)}; a waveform needs the transforms "
                       "audio_to_float|pad_crop(...)|log_mel(...)")
    if modality == "audio" and x.shape[1] % cfg.patch_audio[0]:
      # Frames need not fit the patch: pad the time axis up, as padding (masked).
      extra = cfg.patch_audio[0] - x.shape[1] % cfg.patch_audio[0]
      mask = jnp.ones(x.shape[:2], bool) if mask is None else mask.astype(bool)
      mask = jnp.pad(mask, ((0, 0), (0, extra)))
      x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
    tok = PatchTokenizer(patch[modality], cfg.encoder.d_model, cfg.max_positions, self.dtype,
                         self.param_dtype, name=f"tokenizer_{modality}")
    tokens = tok(x)
    if mask is None:
      return tokens, None
    if modality != "audio":
      raise ValueError(f"task {task.name!r}: a padding mask for {modality!r} is not supported "
                       "(image and video inputs have one fixed shape)")
    # A spectrogram patch is real when its first frame is (padding sits at the end), so the
    # same clip padded to two lengths gives the same real tokens.
    frames_t, grid_f = cfg.patch_audio[0], x.shape[2] // cfg.patch_audio[1]
    mask_BT = mask.astype(bool)[:, ::frames_t][:, :x.shape[1] // frames_t]
    return tokens, jnp.repeat(mask_BT, grid_f, axis=1)

  def encode(self, encoder: nn.Module, modality: str, x: jax.Array, task: Task,
             deterministic: bool, mask: jax.Array | None = None,
             valid_B: jax.Array | None = None, prompts: nn.Module | None = None) -> jax.Array:
    """Tokenize -> (DropToken) -> (prepend a soft prompt) -> shared encoder -> pool the
    input's positions -> output projection: [B, D].

    `valid_B` (eval batches) marks real examples: the fill's tokens are masked too, so
    they take no expert capacity and do not change the real examples' outputs."""
    tokens, mask = self._tokenize(modality, x, mask, task)
    if valid_B is not None:
      valid_BS = jnp.broadcast_to(valid_B.astype(bool)[:, None], tokens.shape[:2])
      mask = valid_BS if mask is None else mask & valid_BS
    rate = task.drop_rate(modality)
    if rate > 0 and not deterministic:
      tokens, mask = drop_tokens(self.make_rng("droptoken"), tokens, mask, rate)
    context = Context.for_batch(tokens.shape[0], task_id=task.task_id,
                                modality_id=MODALITIES.index(modality))
    num_prompt = 0
    if prompts is not None:  # SMoP: the routed prompt goes first; its outputs are not pooled
      prompt_BSD = prompts(tokens, mask)
      num_prompt = prompt_BSD.shape[1]
      tokens = jnp.concatenate([prompt_BSD.astype(tokens.dtype), tokens], axis=1)
      if mask is not None:
        real_B = jnp.ones(mask.shape[:1], bool) if valid_B is None else valid_B.astype(bool)
        mask = jnp.concatenate([jnp.broadcast_to(real_B[:, None], (mask.shape[0], num_prompt)),
                                mask], axis=1)
    h = encoder(tokens, mask_BS=mask, context=context, deterministic=deterministic)
    h, mask = h[:, num_prompt:], None if mask is None else mask[:, num_prompt:]
    return self._dense(self.config.encoder.d_model, f"output_{modality}")(_masked_mean(h, mask))

  def _pair_embedding(self, pair: tuple[str, str], side: str, feature_BD: jax.Array):
    name = f"contrast_{pair[0]}_{pair[1]}"
    return _normalize(self._dense(self.config.embed_dim, f"{name}_{side}")(feature_BD))

  def _logit_scale(self, pair: tuple[str, str]) -> jax.Array:
    init = nn.initializers.constant(np.log(1.0 / self.config.init_temperature))
    log_scale = self.param(f"contrast_{pair[0]}_{pair[1]}_log_scale", init, (), jnp.float32)
    return jnp.exp(jnp.minimum(log_scale, np.log(100.0)))  # CLIP's clip at 100

  @nn.compact
  def __call__(self, batch: dict[str, jax.Array], *, task: Task, deterministic: bool = True,
               zero_shot: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    encoder = TransformerStack(self.config.encoder, self.dtype, self.param_dtype, name="encoder")
    prompts = None  # one pool shared by every modality and task
    if self.config.prompts is not None:
      prompts = PromptMixture(self.config.prompts, self.dtype, self.param_dtype, name="prompts")
    valid_B = batch.get(VALID)
    encode = lambda m, x, mask=None, valid=valid_B: self.encode(encoder, m, x, task,
                                                                deterministic, mask, valid,
                                                                prompts)
    for m in task.modalities:
      if m not in batch:
        raise ValueError(f"task {task.name!r} reads {m!r} but the batch has {sorted(batch)}")
    masks = {m: batch.get(f"{m}_mask") for m in task.modalities}
    weights_B = None if valid_B is None else valid_B.astype(jnp.float32)
    if task.kind == "classify":
      m = task.modalities[0]
      logits = self._dense(task.num_classes, f"classifier_{task.head_name}")(
          encode(m, batch[m], masks[m])).astype(jnp.float32)
      loss = losses.softmax_cross_entropy(logits, batch["label"], weights_B)
      return loss, {"loss": loss, "accuracy": _accuracy(logits, batch["label"], weights_B)}
    if task.kind != "contrastive":
      raise ValueError(f"IMPModel does not train task kind {task.kind!r}")
    a, b = pair = task.modalities
    z_a = self._pair_embedding(pair, a, encode(a, batch[a], masks[a]))
    if zero_shot:
      return self._zero_shot(pair, z_a, batch, encode, task, weights_B)
    z_b = self._pair_embedding(pair, b, encode(b, batch[b], masks[b]))
    scale = self._logit_scale(pair)
    logits = scale * z_a @ z_b.T
    if valid_B is not None:  # the fill is no negative for anyone, either way round
      valid = valid_B.astype(bool)
      logits = jnp.where(valid[:, None] & valid[None, :], logits, -1e9)
    labels = jnp.arange(logits.shape[0])
    loss = 0.5 * (losses.softmax_cross_entropy(logits, labels, weights_B) +
                  losses.softmax_cross_entropy(logits.T, labels, weights_B))
    return loss, {"loss": loss, f"{a}_to_{b}_accuracy": _accuracy(logits, labels, weights_B),
                  f"{b}_to_{a}_accuracy": _accuracy(logits.T, labels, weights_B),
                  "temperature": 1.0 / scale}

  def _zero_shot(self, pair, z_a, batch, encode, task, weights_B=None):
    """Classify modality a by similarity to the text prompts of every class."""
    if pair[1] != "text" or not task.class_names:
      raise ValueError(f"zero-shot eval of task {task.name!r} needs modalities (x, 'text') and "
                       "class_names")
    length = batch["text"].shape[1]
    if task.prompt_ids:  # tokenized by the task's own tokenize transform
      ids = [list(p[:length]) for p in task.prompt_ids]
    else:
      tok = ByteTokenizer()
      ids = [list(tok.encode_bytes(task.prompt_template.format(c).encode("utf-8"))[:length])
             for c in task.class_names]
    prompts = np.zeros((len(ids), length), np.int32)
    mask = np.zeros((len(ids), length), bool)
    for i, row in enumerate(ids):
      prompts[i, :len(row)], mask[i, :len(row)] = row, True
    z_text = self._pair_embedding(pair, "text", encode("text", jnp.asarray(prompts),
                                                       jnp.asarray(mask), None))
    logits = z_a @ z_text.T
    return jnp.zeros(()), {"zero_shot_accuracy": _accuracy(logits, batch["label"], weights_B)}
