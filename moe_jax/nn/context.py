"""Context: what a router may condition on, carried from the model to every MoE layer.

Axis letters: B batch, T tokens, U condition features.

Every field is optional and has one row per example ([B, ...]); the MoE layer
expands it to one row per token ([T, ...]) before routing, so a router reads
`context.task_id[t]` for token t. Models fill what they know (IMP: task and
modality; a diffusion model: the noise level), the stack passes it through
loops, scan and remat unchanged, and routers that do not condition ignore it.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Context:
  """Per-example routing context; None fields are absent.

  task_id: int32 [B], the task's index in the experiment (Task.task_id).
  modality_id: int32 [B], index in moe_jax.tasks.MODALITIES.
  noise_level: float32 [B], a diffusion timestep or noise level.
  condition_BU: float32 [B, U], any condition vector (e.g. an architecture code).
  modality_BS: int32 [B, S], a per-token modality (a merged multimodal sequence); where
    absent, every token has its example's modality_id. Untied (MoT) layers select their
    weights by it; MoE routers see it as a per-token modality_id.
  """

  task_id: jax.Array | None = None
  modality_id: jax.Array | None = None
  noise_level: jax.Array | None = None
  condition_BU: jax.Array | None = None
  modality_BS: jax.Array | None = None

  @classmethod
  def for_batch(cls, batch_size: int, *, task_id: int | None = None,
                modality_id: int | None = None, **arrays) -> "Context":
    """A context whose integer ids are the same for every example of the batch."""
    full = lambda v: None if v is None else jnp.full((batch_size,), v, jnp.int32)
    return cls(task_id=full(task_id), modality_id=full(modality_id), **arrays)

  def per_token(self, num_tokens: int) -> "Context":
    """Each example's row repeated over its tokens: [B, ...] -> [T, ...] with T = B * S."""

    def expand(a):
      if a is None:
        return None
      if num_tokens % a.shape[0]:
        raise ValueError(f"context has {a.shape[0]} rows, which do not divide the "
                         f"{num_tokens} tokens of the MoE input")
      return jnp.repeat(a, num_tokens // a.shape[0], axis=0)

    per_token = self
    if self.modality_BS is not None:  # already one value per token: flatten, do not repeat
      if self.modality_BS.size != num_tokens:
        raise ValueError(f"context.modality_BS has shape {tuple(self.modality_BS.shape)}, "
                         f"not one value per token of the {num_tokens} tokens of the MoE input")
      per_token = self.replace(modality_id=None, modality_BS=None)
    out = jax.tree.map(expand, per_token, is_leaf=lambda a: a is None)
    if self.modality_BS is not None:
      out = out.replace(modality_id=self.modality_BS.reshape(-1).astype(jnp.int32))
    return out

  def token_modality(self, batch: int, seq: int) -> jax.Array:
    """int32 [B, S]: modality_BS, or else each example's modality_id on all its tokens."""
    if self.modality_BS is not None:
      if self.modality_BS.shape != (batch, seq):
        raise ValueError(f"context.modality_BS has shape {tuple(self.modality_BS.shape)}; "
                         f"expected [batch, seq]=({batch}, {seq})")
      return self.modality_BS.astype(jnp.int32)
    if self.modality_id is None:
      raise ValueError("an untied (per-modality) layer needs the context's modality: "
                       "Context(modality_id=[B]) or Context(modality_BS=[B, S])")
    return jnp.broadcast_to(self.modality_id.astype(jnp.int32)[:, None], (batch, seq))
