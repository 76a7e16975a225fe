"""Routing statistics of one MoE layer over groups of tokens, from the per-token routing
record the layer sows (moe_jax.nn.layers.moe.routing_record), in numpy.

Axis letters: N tokens, K slots per token, E experts.

Per group: expert load (share of the slots that ran, per expert), router entropy (mean
over tokens of the entropy of the softmax of the router logits, nats), dropped slots
and dropped tokens (valid slots / tokens that ran on no expert), top-1 share (mean over
routed tokens of the largest combine weight over the sum of the token's kept weights),
co-activation (share of tokens that ran on both expert i and expert j; its diagonal is
each expert's token share), each expert's mean combine weight over its slots that ran and the routing distribution (mean router probabilities; the
load where the router has no logits). Alignment between two groups is the Jensen-Shannon
divergence of their routing distributions, in bits (0: identical, 1: disjoint), as in
Bandarkar et al., "Multilingual Routing in Mixture-of-Experts", arXiv:2510.04694 (which
averages post-softmax routing weights per language and layer; its entropy
normalisation is not applied here); the same divergence between the groups' expert loads
is reported beside it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
  """Jensen-Shannon divergence of two distributions over the same support, in bits."""
  p = np.asarray(p, np.float64) / max(float(np.sum(p)), 1e-30)
  q = np.asarray(q, np.float64) / max(float(np.sum(q)), 1e-30)
  m = 0.5 * (p + q)

  def kl(a):
    nz = a > 0
    return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

  return 0.5 * kl(p) + 0.5 * kl(q)


@dataclasses.dataclass
class GroupStats:
  """Running sums of one (layer, group)."""

  num_experts: int
  tokens: int = 0
  routed_tokens: int = 0
  valid_slots: int = 0
  kept_slots: int = 0
  entropy_sum: float = 0.0
  prob_tokens: int = 0
  top1_sum: float = 0.0
  load_E: np.ndarray = None
  prob_sum_E: np.ndarray = None
  weight_sum_E: np.ndarray = None
  coact_EE: np.ndarray = None

  def __post_init__(self):
    E = self.num_experts
    self.load_E = np.zeros(E, np.float64)
    self.prob_sum_E = np.zeros(E, np.float64)
    self.weight_sum_E = np.zeros(E, np.float64)
    self.coact_EE = np.zeros((E, E), np.float64)

  def add(self, expert_index_NK, weight_NK, kept_NK, valid_NK, probs_NE=None) -> None:
    """Tokens of this group (already selected: real tokens only)."""
    E = self.num_experts
    kept = np.asarray(kept_NK, bool)
    onehot_NKE = np.eye(E, dtype=np.float64)[np.asarray(expert_index_NK) % E] * kept[..., None]
    ran_NE = np.minimum(onehot_NKE.sum(1), 1.0)  # a token runs on an expert once
    self.tokens += kept.shape[0]
    self.valid_slots += int(np.sum(valid_NK))
    self.kept_slots += int(kept.sum())
    self.load_E += onehot_NKE.sum((0, 1))
    self.coact_EE += ran_NE.T @ ran_NE
    routed = kept.any(-1)
    self.routed_tokens += int(routed.sum())
    w = np.where(kept, np.asarray(weight_NK, np.float64), 0.0)
    self.weight_sum_E += np.einsum("nk,nke->e", w, onehot_NKE)
    total = w.sum(-1)
    share = np.where(total > 0, w.max(-1) / np.where(total > 0, total, 1.0), 0.0)
    self.top1_sum += float(share[routed].sum())
    if probs_NE is not None:
      p = np.asarray(probs_NE, np.float64)[:, :E]  # null-expert columns left out
      full = np.asarray(probs_NE, np.float64)
      self.entropy_sum += float(-np.sum(full * np.log(np.where(full > 0, full, 1.0))))
      self.prob_sum_E += p.sum(0)
      self.prob_tokens += p.shape[0]

  def summary(self) -> dict[str, Any]:
    t = max(self.tokens, 1)
    has_probs = self.prob_tokens > 0
    load = self.load_E / max(self.load_E.sum(), 1.0)
    return {
        "tokens": self.tokens,
        "expert_load": load.tolist(),
        "max_over_mean_load": float(load.max() * len(load)) if self.kept_slots else 0.0,
        "router_entropy": self.entropy_sum / self.prob_tokens if has_probs else None,
        "dropped_slot_rate": 1.0 - self.kept_slots / max(self.valid_slots, 1),
        "dropped_token_rate": 1.0 - self.routed_tokens / t,
        "top1_share": self.top1_sum / max(self.routed_tokens, 1),
        "coactivation": (self.coact_EE / t).tolist(),
        # Mean combine weight of each expert's slots that ran (0 where none ran).
        "mean_weight": (self.weight_sum_E / np.maximum(self.load_E, 1.0)).tolist(),
        "routing_distribution": (self.prob_sum_E / self.prob_tokens if has_probs
                                 else load).tolist(),
    }


ALL = "all"  # the group every token is in as well (collect adds it)


class RoutingStats:
  """GroupStats for every (layer, group) seen, in first-seen order."""

  def __init__(self):
    self.layers: dict[str, dict[str, GroupStats]] = {}

  def add(self, layer: str, record: dict[str, np.ndarray], group_of_token: np.ndarray,
          group_names: dict[int, str]) -> None:
    """One call's routing record (leading token shape [...]) with each token's group id
    (same leading shape; tokens of a group id missing from `group_names` are skipped)."""
    index = np.asarray(record["expert_index"])
    K = index.shape[-1]
    num_experts = int(np.asarray(record["num_experts"]).reshape(-1)[0])
    flat = lambda a, tail: np.asarray(a).reshape(-1, *tail)
    valid_tok = flat(record["token_valid"], ()).astype(bool)
    groups = flat(group_of_token, ())
    index, weight = flat(index, (K,)), flat(record["weight"], (K,))
    kept = flat(record["kept"], (K,)).astype(bool)
    valid = flat(record["valid"], (K,)).astype(bool)
    probs = flat(record["probs"], (np.asarray(record["probs"]).shape[-1],)) \
        if "probs" in record else None
    per_layer = self.layers.setdefault(layer, {})
    for gid in np.unique(groups[valid_tok]):
      name = group_names.get(int(gid))
      if name is None:
        continue
      sel = valid_tok & (groups == gid)
      stats = per_layer.setdefault(name, GroupStats(num_experts))
      stats.add(index[sel], weight[sel], kept[sel], valid[sel],
                None if probs is None else probs[sel])

  def summary(self) -> dict[str, Any]:
    """{layer: {"groups": {group: stats}, "alignment": {"a|b": JS bits between routing
    distributions}, "load_alignment": {"a|b": JS bits between expert loads}}}."""
    out = {}
    for layer, groups in self.layers.items():
      order = [g for g in groups if g != ALL] + [g for g in groups if g == ALL]
      summaries = {g: groups[g].summary() for g in order}
      names = [g for g in summaries if g != ALL]  # alignment between the groups only
      pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
      alignment = {f"{a}|{b}": js_divergence(summaries[a]["routing_distribution"],
                                              summaries[b]["routing_distribution"])
                   for a, b in pairs}
      # The same between the expert loads (what ran): a flat router can route two groups
      # to different experts while their mean probabilities stay close.
      load_alignment = {f"{a}|{b}": js_divergence(summaries[a]["expert_load"],
                                                   summaries[b]["expert_load"])
                        for a, b in pairs}
      out[layer] = {"groups": summaries, "alignment": alignment,
                    "load_alignment": load_alignment}
    return out
