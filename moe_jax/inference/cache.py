"""The KV cache: per attention layer, preallocated [B, L] slots of keys and values.

`empty_cache` builds it from shapes alone (jax.eval_shape of one max-length decode call
creates the "cache" collection; nothing is computed), all slots empty. A decode call
writes its tokens' keys and values at the next free slots and attends over the real
ones (moe_jax/nn/attention/mha.py), so the cache keeps one shape for a whole generation:
one compile per (batch, length) bucket.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def empty_cache(module, variables: dict[str, Any], batch: int, length: int) -> Any:
  """Zeroed cache pytree for `batch` rows of up to `length` tokens."""
  def create():
    return module.apply(variables, jnp.zeros((batch, length), jnp.int32), decode=True,
                        method=module.logits, mutable=["cache"])[1]["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(create))
