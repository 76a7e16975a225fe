"""Router auxiliary losses and metrics, and helpers to collect what MoE layers sow.

Axis letters: T tokens, E experts, K experts per token.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

AUX_LOSS_COLLECTION = "aux_loss"  # weighted scalars; the trainer adds their sum
METRICS_COLLECTION = "moe_metrics"  # raw per-layer losses and router metrics
# Per-token routing (experts, weights, router probabilities), sown only when an apply asks
# for this collection (moe_jax.analysis): training and eval never carry it.
ROUTING_COLLECTION = "routing"


def token_mean(x_T: jax.Array, valid_T: jax.Array | None = None) -> jax.Array:
  """Mean over the leading (token) axis, over valid tokens only when `valid_T` is given."""
  if valid_T is None:
    return x_T.mean(0)
  w_T = valid_T.astype(x_T.dtype).reshape(valid_T.shape + (1,) * (x_T.ndim - 1))
  return (x_T * w_T).sum(0) / jnp.maximum(w_T.sum(), 1.0)


def load_balance_loss(probs_TE: jax.Array, assigned_TE: jax.Array,
                      valid_T: jax.Array | None = None) -> jax.Array:
  """Switch-Transformer load-balancing loss E * sum_e f_e * P_e.

  f_e is the share of all token->expert assignments that went to expert e and
  P_e the mean router probability of e (over valid tokens; padding's rows of
  `assigned_TE` must be 0). It is 1.0 for a perfectly uniform router and grows
  to E when one expert takes everything.
  """
  num_experts = probs_TE.shape[-1]
  f_E = assigned_TE.sum(0) / jnp.maximum(assigned_TE.sum(), 1.0)
  p_E = token_mean(probs_TE, valid_T)
  return num_experts * jnp.sum(f_E * p_E)


BALANCE_COUNTS = ("slots", "top1", "hf")
BALANCE_SCOPES = ("batch", "sequence", "group")


def balance_loss(probs_TE: jax.Array, index_TK: jax.Array, valid_T: jax.Array | None = None, *,
                 count: str = "slots", group_size: int | None = None,
                 null_experts: int = 0) -> jax.Array:
  """The load-balancing loss E * sum_e f_e * P_e in its published variants.

  P_e is the mean routing probability of expert e; f_e counts assignments:
    "slots": the share of all T*k token->expert slots that chose e (1.0 when uniform);
    "top1":  the share of tokens whose first choice is e (Switch, arXiv:2101.03961 eq. 4;
             GShard uses the same top-1 count);
    "hf":    Hugging Face's Mixtral/Qwen `load_balancing_loss_func`: per-slot-rank shares
             summed over the k ranks, i.e. k times "slots".
  `group_size` = S computes the loss per group of S tokens and averages the groups:
  with S = the sequence length this is DeepSeek-V3's sequence-wise balance loss
  (arXiv:2412.19437 eqs. 17-20, without its alpha). Without it the loss covers every
  token of the call: under jit on a data-parallel mesh that is the whole global batch,
  the global-batch balance loss (Qwen, arXiv:2501.11873).
  """
  T, E = probs_TE.shape
  K = index_TK.shape[1]
  ranks = index_TK[:, :1] if count == "top1" else index_TK
  assigned_TE = jax.nn.one_hot(ranks, E, dtype=jnp.float32).sum(1)
  if valid_T is not None:
    assigned_TE = assigned_TE * valid_T[:, None]
  if null_experts:  # a row's null count spread evenly: f_null -> mean f of the nulls
    real_TE, null_TE = assigned_TE[:, :E - null_experts], assigned_TE[:, E - null_experts:]
    assigned_TE = jnp.concatenate(
        [real_TE, jnp.broadcast_to(null_TE.mean(-1, keepdims=True), null_TE.shape)], axis=-1)
  scale = K if count == "hf" else 1
  S = group_size or T
  G = T // S
  per_group = jax.vmap(load_balance_loss)(
      probs_TE.reshape(G, S, E), assigned_TE.reshape(G, S, E),
      None if valid_T is None else valid_T.reshape(G, S))
  return scale * per_group.mean()


def router_z_loss(logits_TE: jax.Array, valid_T: jax.Array | None = None) -> jax.Array:
  """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps logits small."""
  return token_mean(jnp.square(jax.nn.logsumexp(logits_TE, axis=-1)), valid_T)


def router_entropy(probs_TE: jax.Array, valid_T: jax.Array | None = None) -> jax.Array:
  """Mean entropy (nats) of each token's routing distribution."""
  return -token_mean(jnp.sum(probs_TE * jnp.log(jnp.maximum(probs_TE, 1e-30)), axis=-1), valid_T)


def sum_aux_losses(collections: dict[str, Any]) -> jax.Array:
  """Sum of every weighted aux loss the MoE layers sowed (0.0 if none): pass the mutable
  collections `apply(..., mutable=[...])` returned; only its "aux_loss" collection counts
  (a layer may sow none, e.g. Soft MoE; metrics and router state are not losses)."""
  leaves = jax.tree_util.tree_leaves(collections.get(AUX_LOSS_COLLECTION, {}))
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
