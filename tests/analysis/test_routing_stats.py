"""Routing statistics on hand-made routing tables, against values worked out by hand."""
import math

import numpy as np
import pytest

from moe_jax.analysis import RoutingStats, js_divergence, layer_records

LN2 = math.log(2)


def test_js_divergence_in_bits():
  assert js_divergence([0.2, 0.8], [0.2, 0.8]) == pytest.approx(0.0, abs=1e-12)
  assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint: 1 bit
  # p = (1/2, 1/2), q = (1, 0), m = (3/4, 1/4):
  # KL(p||m) = 1/2 log2(2/3) + 1/2 log2(2); KL(q||m) = log2(4/3).
  want = 0.5 * (0.5 * math.log2(2 / 3) + 0.5) + 0.5 * math.log2(4 / 3)
  assert js_divergence([0.5, 0.5], [1, 0]) == pytest.approx(want)
  assert js_divergence([2, 2], [3, 0]) == pytest.approx(want)  # counts are normalised


def _table():
  """4 tokens [B=2, S=2], K=2 slots, E=3 experts.

  token 0: experts (0, 1), weights (0.6, 0.4), both ran
  token 1: experts (0, 2), weights (0.7, 0.3), the second slot dropped (capacity)
  token 2: experts (1, 2), weights (0.5, 0.5), both ran
  token 3: padding
  """
  return {
      "expert_index": np.array([[[0, 1], [0, 2]], [[1, 2], [0, 1]]]),
      "weight": np.array([[[0.6, 0.4], [0.7, 0.3]], [[0.5, 0.5], [0.5, 0.5]]]),
      "valid": np.array([[[1, 1], [1, 1]], [[1, 1], [1, 1]]], bool),
      "kept": np.array([[[1, 1], [1, 0]], [[1, 1], [1, 1]]], bool),
      "probs": np.array([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]],
                         [[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]]]),
      "token_valid": np.array([[True, True], [True, False]]),
      "modality": np.full((2, 2), -1),
      "num_experts": np.array(3),
  }


def test_per_group_statistics_equal_the_hand_computed_ones():
  stats = RoutingStats()
  # Tokens 0 and 1 are group "a", token 2 is group "b"; token 3 (padding) counts nowhere.
  stats.add("layer", _table(), np.array([[0, 0], [1, 1]]), {0: "a", 1: "b"})
  stats.add("layer", _table(), np.zeros((2, 2), int), {0: "all"})
  out = stats.summary()["layer"]
  pooled = out["groups"]["all"]
  assert pooled["tokens"] == 3
  # Slots that ran: expert 0 twice (t0, t1), expert 1 twice (t0, t2), expert 2 once (t2).
  np.testing.assert_allclose(pooled["expert_load"], [0.4, 0.4, 0.2])
  assert pooled["max_over_mean_load"] == pytest.approx(1.2)
  assert pooled["dropped_slot_rate"] == pytest.approx(1 / 6)  # 5 of 6 chosen slots ran
  assert pooled["dropped_token_rate"] == 0.0  # every real token ran somewhere
  # Top weight over the kept weights: 0.6/1.0, 0.7/0.7, 0.5/1.0.
  assert pooled["top1_share"] == pytest.approx((0.6 + 1.0 + 0.5) / 3)
  # Entropies: ln 2, 0, 1.5 ln 2.
  assert pooled["router_entropy"] == pytest.approx(2.5 * LN2 / 3)
  # Co-activation, share of the 3 tokens: t0 ran on {0, 1}, t1 on {0}, t2 on {1, 2}.
  np.testing.assert_allclose(pooled["coactivation"], np.array(
      [[2, 1, 0], [1, 2, 1], [0, 1, 1]]) / 3)
  # Mean weight of the slots that ran: e0 (0.6, 0.7), e1 (0.4, 0.5), e2 (0.5).
  np.testing.assert_allclose(pooled["mean_weight"], [0.65, 0.45, 0.5])
  a, b = out["groups"]["a"], out["groups"]["b"]
  assert (a["tokens"], b["tokens"]) == (2, 1)
  np.testing.assert_allclose(a["routing_distribution"], [0.75, 0.25, 0.0])
  np.testing.assert_allclose(b["routing_distribution"], [0.25, 0.25, 0.5])
  np.testing.assert_allclose(a["expert_load"], [2 / 3, 1 / 3, 0.0])
  assert a["dropped_slot_rate"] == pytest.approx(0.25)
  # JS((3/4, 1/4, 0), (1/4, 1/4, 1/2)): m = (1/2, 1/4, 1/4).
  kl_a = 0.75 * math.log2(0.75 / 0.5) + 0.25 * math.log2(1.0)
  kl_b = 0.25 * math.log2(0.5) + 0.25 * math.log2(1.0) + 0.5 * math.log2(2.0)
  assert list(out["alignment"]) == ["a|b"]  # the pooled group is not a pair member
  assert out["alignment"]["a|b"] == pytest.approx(0.5 * kl_a + 0.5 * kl_b)
  # Between the loads: a ran (2/3, 1/3, 0), b (0, 1/2, 1/2); m = (1/3, 5/12, 1/4).
  kl_a = (2 / 3) * math.log2(2) + (1 / 3) * math.log2((1 / 3) / (5 / 12))
  kl_b = 0.5 * math.log2(0.5 / (5 / 12)) + 0.5 * math.log2(0.5 / 0.25)
  assert out["load_alignment"]["a|b"] == pytest.approx(0.5 * kl_a + 0.5 * kl_b)


def test_a_token_whose_slots_all_dropped_counts_as_a_dropped_token():
  t = _table()
  t["kept"][0, 1] = False  # token 1 now runs nowhere
  stats = RoutingStats()
  stats.add("layer", t, np.zeros((2, 2), int), {0: "all"})
  s = stats.summary()["layer"]["groups"]["all"]
  assert s["dropped_token_rate"] == pytest.approx(1 / 3)
  assert s["top1_share"] == pytest.approx((0.6 + 0.5) / 2)  # over routed tokens only


def test_scanned_records_split_into_one_layer_per_repeat():
  t = _table()
  stacked = {k: np.stack([v, v]) for k, v in t.items()}
  routing = {"decoder": {"scan_0": {"block_1": {"moe": {"moe": (stacked,)}}},
                         "layers": {"block_0": {"moe": {"moe": (t, t)}}}}}
  got = [(name, call) for name, call, _ in layer_records(routing)]
  assert got == [("decoder/scan_0/block_1/moe@0", 0), ("decoder/scan_0/block_1/moe@1", 0),
                 ("decoder/layers/block_0/moe", 0), ("decoder/layers/block_0/moe", 1)]
