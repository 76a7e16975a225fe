"""Decoder-only (MoE) language model over bytes.

Axis letters: B batch, S sequence, D model dim, V vocabulary.
`DecoderLM(batch, task=..., deterministic=...) -> (loss, metrics)` where
batch["tokens"] is int32 [B, S + 1]: inputs tokens[:, :-1], targets tokens[:, 1:].
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
from moe_jax.tasks import MODALITIES, VALID, Task
from moe_jax.config import TransformerConfig
from moe_jax.tokenizer import ByteTokenizer
from moe_jax.nn.transformer import TransformerStack


@dataclasses.dataclass(frozen=True)
class LMConfig:
  decoder: TransformerConfig
  vocab_size: int = ByteTokenizer.vocab_size
  lm_head_bias: bool = True  # imported checkpoints (Mixtral, Qwen, OLMoE) have none
  tie_embeddings: bool = False  # logits from the embedding matrix (no lm_head)


class DecoderLM(nn.Module):
  config: LMConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def logits(self, tokens_BS: jax.Array, *, positions_BS: jax.Array | None = None,
             mask_BS: jax.Array | None = None, deterministic: bool = True,
             task_id: int = 0, decode: bool = False) -> jax.Array:
    """Next-token logits [B, S, V] for int32 tokens [B, S] (positions 0.. unless given;
    `mask_BS` False marks padding keys). `decode`: attend over and extend the KV cache
    (mutable "cache" collection; moe_jax/inference/cache.py)."""
    cfg = self.config
    embed = nn.Embed(cfg.vocab_size, cfg.decoder.d_model, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="embedding")
    context = Context.for_batch(tokens_BS.shape[0], task_id=task_id,
                                modality_id=MODALITIES.index("tokens"))
    h_BSD = TransformerStack(cfg.decoder, self.dtype, self.param_dtype, name="decoder")(
        embed(tokens_BS), mask_BS=mask_BS, positions_BS=positions_BS, context=context,
        deterministic=deterministic, decode=decode)
    if cfg.tie_embeddings:
      return embed.attend(h_BSD)
    return nn.Dense(cfg.vocab_size, use_bias=cfg.lm_head_bias, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="lm_head")(h_BSD)

  def __call__(self, batch: dict[str, jax.Array], *, task: Task, deterministic: bool = True,
               zero_shot: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    del zero_shot
    cfg = self.config
    if not cfg.decoder.causal:
      raise ValueError("DecoderLM needs a causal decoder: set model.causal=True")
    if task.kind != "lm" or "tokens" not in batch:
      raise ValueError(f"DecoderLM trains kind='lm' tasks on batch['tokens']; got task "
                       f"{task.name!r} of kind {task.kind!r} with keys {sorted(batch)}")
    tokens = batch["tokens"]
    inputs_BS, targets_BS = tokens[:, :-1], tokens[:, 1:]
    logits_BSV = self.logits(inputs_BS, deterministic=deterministic, task_id=task.task_id)
    weights = (targets_BS != 0).astype(jnp.float32)  # 0 is padding
    if VALID in batch:  # eval fill of the last batch
      weights = weights * batch[VALID].astype(jnp.float32)[:, None]
    loss = losses.softmax_cross_entropy(logits_BSV, targets_BS, weights)
    correct = (jnp.argmax(logits_BSV, -1) == targets_BS).astype(jnp.float32)
    accuracy = jnp.sum(correct * weights) / jnp.maximum(weights.sum(), 1.0)
    return loss, {"loss": loss, "accuracy": accuracy, "bits_per_byte": loss / np.log(2.0)}
