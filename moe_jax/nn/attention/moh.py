"""Mixture-of-Head attention (MoH): attention heads as experts, weighted per token.

Jin, Zhu, Yuan, Yan, "MoH: Multi-Head Attention as Mixture-of-Head Attention"
(arXiv:2410.11842). Multi-head attention is a sum over heads, O = sum_i H^i W_O^i (H^i head
i's attention output, W_O^i its rows of the output projection); MoH weights that sum,
O = sum_i g_i H^i W_O^i, with h_s shared heads always on and, per token, the top k of the
h - h_s routed heads. Two-stage routing, per token x_t:
  g_i = a_1 Softmax(W_s x_t)_i                                   shared heads i <= h_s
  g_i = a_2 Softmax(W_r x_t)_i  if i is among the token's top k   routed heads
        0                        otherwise
  [a_1, a_2] = Softmax(W_h x_t)
`unit_scale` (default) applies the scales of the authors' released code (SkyworkAI/MoH):
the shared softmax times h_s, the routed weights renormalised over the chosen k and times
k, [a_1, a_2] times 2. A uniform router then gives every active head weight 1, so MoH with
every head active is standard multi-head attention (and a converted MHA model starts where
it was). unit_scale=False is the formula above as written.

Head load balance (the paper's L_b, weighted by beta = balance_weight, 0.01 in the paper):
f_i the fraction of (real) tokens that chose routed head i, P_i the mean of
Softmax(W_r x_t)_i; the loss is h_r * sum_i f_i P_i over the h_r routed heads (the authors'
code's normalisation: k for a uniform router, up to h_r when one head holds all of every
token's probability).

The heads are all computed and then weighted (inactive ones by 0): MoH here changes the
model, not its FLOPs. Keys and values are per head as in multi-head attention, so the KV
cache (decoding) is unchanged; only the querying token's weights differ.

Axis letters: B batch, S sequence, D model dim, H heads (all, or the shared / routed
subset named by the variable), Q features per head, T tokens (B * S).
Sows (not while initializing) "aux_loss"/"moh": balance_weight * L_b, and
"moe_metrics"/"moh": head_balance_loss, active_head_fraction (mean over real tokens of the
share of heads with a non-zero weight) and max_head_load (the busiest routed head's share of
the routed choices); the train step adds the first and logs the others as moe/<name>.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import validation as V
from moe_jax.nn import losses
from moe_jax.nn.attention import ATTENTIONS
from moe_jax.nn.attention.mha import SelfAttention


def resolve_heads(num_heads: int, shared_heads: int | None, k: int | None) -> tuple[int, int]:
  """(h_s, k) with defaults: half the heads shared, half of the others chosen per token."""
  h_s = num_heads // 2 if shared_heads is None else shared_heads
  routed = num_heads - h_s
  if k is None:
    k = max(1, routed // 2) if routed else 0
  return h_s, k


def head_weights(shared_logits_TH: jax.Array | None, routed_logits_TH: jax.Array | None,
                 stage_logits_T2: jax.Array | None, k: int, unit_scale: bool = True):
  """Per-token head weights g [T, h_s + h_r] (shared heads first) from router logits.

  Returns (g_TH, routed_probs_TH, chosen_TH): the routed softmax and the 0/1 top-k choice
  (None without routed heads), for the balance loss. A stage is absent (None) when its
  group is empty; with one group only, that group's weights are used as they are.
  """
  parts = []
  if shared_logits_TH is not None:
    shared = jax.nn.softmax(shared_logits_TH, axis=-1)
    parts.append(shared * shared.shape[-1] if unit_scale else shared)
  probs, chosen = None, None
  if routed_logits_TH is not None:
    probs = jax.nn.softmax(routed_logits_TH, axis=-1)
    _, top_TK = jax.lax.top_k(routed_logits_TH, k)
    chosen = jax.nn.one_hot(top_TK, probs.shape[-1], dtype=probs.dtype).sum(1)
    routed = probs * chosen
    if unit_scale:
      routed = k * routed / jnp.maximum(routed.sum(-1, keepdims=True),
                                        jnp.finfo(routed.dtype).tiny)
    parts.append(routed)
  if len(parts) == 2:
    stage = jax.nn.softmax(stage_logits_T2, axis=-1) * (2.0 if unit_scale else 1.0)
    parts = [parts[0] * stage[:, :1], parts[1] * stage[:, 1:]]
  return jnp.concatenate(parts, axis=-1), probs, chosen


def head_balance_loss(probs_TH: jax.Array, chosen_TH: jax.Array,
                      valid_T: jax.Array | None = None) -> jax.Array:
  """h_r * sum_i f_i P_i over the h_r routed heads (see the module docstring)."""
  f_H = losses.token_mean(chosen_TH, valid_T)
  p_H = losses.token_mean(probs_TH, valid_T)
  return probs_TH.shape[-1] * jnp.sum(f_H * p_H)


@ATTENTIONS.register("moh")
class MoHAttention(SelfAttention):
  """SelfAttention whose head outputs are weighted per token by MoH's two-stage router.

  The q/k/v/output parameters are SelfAttention's (same names and shapes); the routers add
  w_shared_DH [D, h_s] (when h_s > 1), w_routed_DH [D, h_r] and w_stage_D2 (when both
  groups exist). shared_heads / k default to num_heads // 2 and half the routed heads.
  """

  shared_heads: int | None = None
  k: int | None = None
  unit_scale: bool = True
  balance_weight: float = 0.01

  OPTIONS = ("shared_heads", "k", "unit_scale", "balance_weight")

  @staticmethod
  def check_options(num_heads: int, shared_heads: int | None = None, k: int | None = None,
                    unit_scale: bool = True, balance_weight: float = 0.01) -> None:
    if shared_heads is not None:
      V.check_int_range("attention.shared_heads", shared_heads, lo=0, hi=num_heads)
    h_s = num_heads // 2 if shared_heads is None else shared_heads
    routed = num_heads - h_s
    if k is not None:
      if routed == 0 and k != 0:
        raise ValueError(f"attention.k={k}: every one of the {num_heads} heads is shared "
                         "(shared_heads=num_heads), so no head is routed; set k=0 or None")
      if routed:
        V.check_int_range("attention.k", k, lo=1, hi=routed)
    if not isinstance(unit_scale, bool):
      raise ValueError(f"attention.unit_scale={unit_scale!r} must be True or False")
    if not V.is_number(balance_weight) or balance_weight < 0:
      raise ValueError(f"attention.balance_weight={balance_weight!r} must be a number >= 0")

  def weight_heads(self, x_BSD, o_BSHQ, mask_BS):
    B, S, D = x_BSD.shape
    H = self.num_heads
    h_s, k = resolve_heads(H, self.shared_heads, self.k)
    h_r = H - h_s
    x_TD = x_BSD.reshape(B * S, D).astype(jnp.float32)
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    logits = lambda name, n: x_TD @ self.param(name, init, (D, n), self.param_dtype).astype(
        jnp.float32)
    # One shared head needs no router: its softmax is 1.
    shared = None if h_s == 0 else (logits("w_shared_DH", h_s) if h_s > 1
                                    else jnp.zeros((B * S, 1), jnp.float32))
    routed = logits("w_routed_DH", h_r) if h_r else None
    stage = logits("w_stage_D2", 2) if h_s and h_r else None
    g_TH, probs, chosen = head_weights(shared, routed, stage, k, self.unit_scale)
    if not self.is_initializing():
      valid_T = None if mask_BS is None else mask_BS.reshape(-1).astype(jnp.float32)
      active = losses.token_mean((g_TH != 0).astype(jnp.float32).mean(-1), valid_T)
      metrics = {"active_head_fraction": active}
      aux = jnp.zeros((), jnp.float32)
      if h_r:
        lb = head_balance_loss(probs, chosen, valid_T)
        load_H = losses.token_mean(chosen, valid_T)
        metrics.update(head_balance_loss=lb,
                       max_head_load=jnp.max(load_H) / jnp.maximum(load_H.sum(), 1e-9))
        aux = self.balance_weight * lb
      self.sow(losses.METRICS_COLLECTION, "moh", metrics)
      self.sow(losses.AUX_LOSS_COLLECTION, "moh", aux)
    g_BSH1 = g_TH.reshape(B, S, H, 1).astype(o_BSHQ.dtype)
    return o_BSHQ * g_BSH1
