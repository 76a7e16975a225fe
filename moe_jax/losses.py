"""Router auxiliary losses and metrics, and helpers to collect what MoE layers sow.

Axis letters: T tokens, E experts, K experts per token.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

AUX_LOSS_COLLECTION = "aux_loss"  # weighted scalars; the trainer adds their sum
METRICS_COLLECTION = "moe_metrics"  # raw per-layer losses and router metrics


def load_balance_loss(probs_TE: jax.Array, assigned_TE: jax.Array) -> jax.Array:
  """Switch-Transformer load-balancing loss E * sum_e f_e * P_e.

  f_e is the share of all token->expert assignments that went to expert e and
  P_e the mean router probability of e. It is 1.0 for a perfectly uniform router
  and grows to E when one expert takes everything.
  """
  num_experts = probs_TE.shape[-1]
  f_E = assigned_TE.sum(0) / jnp.maximum(assigned_TE.sum(), 1.0)
  p_E = probs_TE.mean(0)
  return num_experts * jnp.sum(f_E * p_E)


def router_z_loss(logits_TE: jax.Array) -> jax.Array:
  """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps logits small."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE, axis=-1)))


def router_entropy(probs_TE: jax.Array) -> jax.Array:
  """Mean entropy (nats) of each token's routing distribution."""
  return -jnp.mean(jnp.sum(probs_TE * jnp.log(jnp.maximum(probs_TE, 1e-30)), axis=-1))


def sum_aux_losses(collections: dict[str, Any]) -> jax.Array:
  """Sum of every weighted aux loss the MoE layers sowed (0.0 if none).

  Pass the mutable collections returned by `apply(..., mutable=[...])`, or just
  the "aux_loss" collection itself.
  """
  tree = collections.get(AUX_LOSS_COLLECTION, collections)
  leaves = jax.tree_util.tree_leaves(tree)
  return sum((jnp.sum(x) for x in leaves), jnp.zeros((), jnp.float32))


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          weights: jax.Array | None = None) -> jax.Array:
  """Mean cross-entropy of integer labels, in float32, optionally weighted."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  if weights is None:
    return nll.mean()
  weights = weights.astype(jnp.float32)
  return jnp.sum(nll * weights) / jnp.maximum(weights.sum(), 1.0)
