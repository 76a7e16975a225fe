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
  """

  task_id: jax.Array | None = None
  modality_id: jax.Array | None = None
  noise_level: jax.Array | None = None
  condition_BU: jax.Array | None = None

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

    return jax.tree.map(expand, self, is_leaf=lambda a: a is None)
