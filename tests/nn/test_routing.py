"""Hand-worked routing cases: every expected number is derived in the comments.

The router's weight is set to the identity so the input rows ARE the logits; rows
are log-probabilities (plus a per-token constant c_t that softmax ignores but the
z-loss sees).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import (CapacityOptions, Context, ExpertChoiceRouter, MoEConfig, MoELayer,
                     RoutingDecision, TopKRouter, assign_capacity_slots, get_dispatcher,
                     token_choice_capacity)
from moe_jax.nn.routing import expert_choice_capacity
from tests import reference
from tests.nn.test_dispatch import random_experts

D_SMALL = 4

# Token x expert probability table for the top-k cases (T=3, E=3).
P_TOP_K = np.array([[0.50, 0.30, 0.20],
                    [0.10, 0.20, 0.70],
                    [0.25, 0.60, 0.15]])
C_T = np.array([1.0, 2.0, 0.0])  # logsumexp of each token's logits


def _route(router, logits_TE, **kw):
  x = jnp.asarray(logits_TE, jnp.float32)
  params = {"params": {"w_DE": jnp.eye(x.shape[1])}}
  return router.apply(params, x, **kw)


def test_top_k_indices_and_renormalised_weights():
  d = _route(TopKRouter(num_experts=3, k=2), np.log(P_TOP_K) + C_T[:, None])
  # token 0: top-2 = e0 (0.5), e1 (0.3) -> renormalised 0.5/0.8, 0.3/0.8
  # token 1: e2 (0.7), e1 (0.2)         -> 0.7/0.9, 0.2/0.9
  # token 2: e1 (0.6), e0 (0.25)        -> 0.6/0.85, 0.25/0.85
  np.testing.assert_array_equal(d.expert_index_TK, [[0, 1], [2, 1], [1, 0]])
  np.testing.assert_allclose(d.weight_TK, [[0.625, 0.375], [7 / 9, 2 / 9],
                                           [0.6 / 0.85, 0.25 / 0.85]], rtol=1e-5)
  assert d.mask_TK is None and d.priority_T is None


def test_top_k_without_renormalisation_keeps_probabilities():
  d = _route(TopKRouter(num_experts=3, k=2, renormalize=False), np.log(P_TOP_K))
  np.testing.assert_allclose(d.weight_TK, [[0.5, 0.3], [0.7, 0.2], [0.6, 0.25]], rtol=1e-5)


def test_top_k_aux_losses():
  d = _route(TopKRouter(num_experts=3, k=2), np.log(P_TOP_K) + C_T[:, None])
  # Assignments: e0 <- tokens 0,2; e1 <- 0,1,2; e2 <- 1: f = [2, 3, 1] / 6.
  # Mean probabilities P = [0.85, 1.10, 1.05] / 3.
  # load balance = E * sum f*P = 3 * (2*0.85 + 3*1.10 + 1*1.05) / 18 = 6.05 / 6.
  np.testing.assert_allclose(d.aux["load_balance_loss"], 6.05 / 6, rtol=1e-5)
  np.testing.assert_allclose(d.aux["expert_load_E"], [2 / 6, 3 / 6, 1 / 6], rtol=1e-5)
  # z-loss = mean(logsumexp^2) = (1 + 4 + 0) / 3.
  np.testing.assert_allclose(d.aux["z_loss"], 5 / 3, rtol=1e-5)
  # entropy = mean_t -sum_e p log p
  h = -(P_TOP_K * np.log(P_TOP_K)).sum(1).mean()
  np.testing.assert_allclose(d.aux["router_entropy"], h, rtol=1e-5)
  assert float(d.aux["dropped_fraction"]) == 0.0


def test_top_k_uniform_router_has_unit_load_balance_loss():
  # All logits equal: P_e = 1/E, and with T=E tokens each picking a different
  # expert (ties broken by index would all pick e0, so use tiny offsets).
  logits = np.eye(4) * 1e-3
  d = _route(TopKRouter(num_experts=4, k=1), logits)
  np.testing.assert_array_equal(d.expert_index_TK[:, 0], [0, 1, 2, 3])
  np.testing.assert_allclose(d.aux["load_balance_loss"], 1.0, rtol=1e-3)


def test_batch_priority_is_top_weight():
  d = _route(TopKRouter(num_experts=3, k=2, renormalize=False, batch_priority=True),
             np.log(P_TOP_K))
  np.testing.assert_allclose(d.priority_T, [0.5, 0.7, 0.6], rtol=1e-5)


def test_jitter_only_while_training():
  router = TopKRouter(num_experts=3, k=1, jitter=0.5)
  x = jnp.asarray(np.log(P_TOP_K), jnp.float32)
  params = {"params": {"w_DE": jnp.eye(3)}}
  a = router.apply(params, x, deterministic=True)
  b = router.apply(params, x, deterministic=False, rngs={"jitter": jax.random.key(0)})
  np.testing.assert_array_equal(a.logits_TE, x)
  assert not np.allclose(b.logits_TE, x)
  # The noise is multiplicative and bounded: |noisy/clean - 1| <= jitter.
  assert np.all(np.abs(np.asarray(b.logits_TE) / np.asarray(x) - 1) <= 0.5 + 1e-6)


# Expert choice, T=3, E=3, capacity_factor=1: C = round(1 * 3 / 3) = 1 token per expert.
P_EC = np.array([[0.50, 0.45, 0.05],
                 [0.30, 0.10, 0.60],
                 [0.20, 0.30, 0.50]])


def test_expert_choice_picks_top_tokens_per_expert():
  d = _route(ExpertChoiceRouter(num_experts=3, capacity_factor=1.0), np.log(P_EC))
  # e0 column [0.5, 0.3, 0.2] -> token 0; e1 [0.45, 0.1, 0.3] -> token 0;
  # e2 [0.05, 0.6, 0.5] -> token 1. Token 0 gets two experts, token 2 none.
  assert d.capacity == 1
  np.testing.assert_array_equal(d.mask_TK, [[1, 1, 0], [0, 0, 1], [0, 0, 0]])
  np.testing.assert_allclose(d.weight_TK, [[0.5, 0.45, 0], [0, 0, 0.6], [0, 0, 0]], rtol=1e-5)
  np.testing.assert_array_equal(d.expert_index_TK, np.tile([0, 1, 2], (3, 1)))
  np.testing.assert_allclose(d.aux["dropped_fraction"], 1 / 3, rtol=1e-5)
  np.testing.assert_allclose(d.aux["expert_load_E"], [1 / 3] * 3, rtol=1e-5)
  assert float(d.aux["load_balance_loss"]) == 0.0


def test_expert_choice_groups_choose_independently():
  # T=4 in groups of 2, E=2, cf=1: C = round(2 / 2) = 1 per expert and group.
  p = np.array([[0.9, 0.1], [0.8, 0.2],    # group 0: e0 -> token 0, e1 -> token 1
                [0.3, 0.7], [0.4, 0.6]])   # group 1: e0 -> token 3, e1 -> token 2
  d = _route(ExpertChoiceRouter(num_experts=2, capacity_factor=1.0, group_size=2), np.log(p))
  np.testing.assert_array_equal(d.mask_TK, [[1, 0], [0, 1], [0, 1], [1, 0]])
  np.testing.assert_allclose(d.weight_TK, [[0.9, 0], [0, 0.2], [0, 0.7], [0.4, 0]], rtol=1e-5)
  assert float(d.aux["dropped_fraction"]) == 0.0


def test_expert_choice_eval_capacity_factor():
  router = ExpertChoiceRouter(num_experts=3, capacity_factor=1.0, eval_capacity_factor=2.0)
  x = jnp.asarray(np.log(P_EC), jnp.float32)
  params = {"params": {"w_DE": jnp.eye(3)}}
  # round(2 * 3 / 3) = 2 tokens per expert at eval, 1 while training.
  assert router.apply(params, x, deterministic=True).capacity == 2
  assert router.apply(params, x, deterministic=False).capacity == 1


def _decision(index_TK, priority_T=None):
  index = jnp.asarray(index_TK, jnp.int32)
  return RoutingDecision(expert_index_TK=index, weight_TK=jnp.ones(index.shape),
                         priority_T=None if priority_T is None else jnp.asarray(priority_T))


def test_capacity_keeps_first_tokens_in_token_order():
  # E=2, C=1: expert 0 is wanted by tokens 0, 1, 3 -> only token 0 fits.
  pos, keep = assign_capacity_slots(_decision([[0], [0], [1], [0]]), 2, 4, 1)
  np.testing.assert_array_equal(pos[:, 0], [0, 1, 0, 2])
  np.testing.assert_array_equal(keep[:, 0], [1, 0, 1, 0])


def test_capacity_keeps_highest_priority_tokens():
  # Same routing; priorities 0.1, 0.9, 0.5, 0.3 -> expert 0 fills with token 1 first.
  pos, keep = assign_capacity_slots(_decision([[0], [0], [1], [0]], [0.1, 0.9, 0.5, 0.3]),
                                    2, 4, 1)
  np.testing.assert_array_equal(pos[:, 0], [2, 0, 0, 1])
  np.testing.assert_array_equal(keep[:, 0], [0, 1, 1, 0])


def test_capacity_fills_all_first_choices_before_second_choices():
  # C=2. Rank 0: t0->e0 (pos 0), t1->e0 (1), t2->e1 (0).
  # Rank 1: t0->e1 (pos 1), t1->e1 (pos 2: dropped), t2->e0 (pos 2: dropped).
  # (Token-major filling would instead give t0's second choice e1 position 0.)
  pos, keep = assign_capacity_slots(_decision([[0, 1], [0, 1], [1, 0]]), 2, 3, 2)
  np.testing.assert_array_equal(pos, [[0, 1], [1, 2], [0, 2]])
  np.testing.assert_array_equal(keep, [[1, 1], [1, 0], [1, 0]])


def test_capacity_is_per_group():
  # Two groups of 2, C=1, everyone wants e0: the first token of each group fits.
  _, keep = assign_capacity_slots(_decision([[0], [0], [0], [0]]), 2, 2, 1)
  np.testing.assert_array_equal(keep[:, 0], [1, 0, 1, 0])


def test_router_logits_are_float32_for_bf16_input():
  router = TopKRouter(num_experts=4, k=2)
  x = jax.random.normal(jax.random.key(0), (8, 16), jnp.bfloat16)
  params = router.init(jax.random.key(1), x)
  d = router.apply(params, x)
  assert d.logits_TE.dtype == jnp.float32 and d.weight_TK.dtype == jnp.float32
  assert params["params"]["w_DE"].dtype == jnp.float32


@pytest.mark.parametrize("router", [TopKRouter(num_experts=3, k=1),
                                    ExpertChoiceRouter(num_experts=3)])
def test_unconditioned_routers_ignore_the_context(router):
  x = jnp.asarray(np.log(P_EC), jnp.float32)
  params = {"params": {"w_DE": jnp.eye(3)}}
  ctx = Context(task_id=jnp.array([0, 1, 2]), noise_level=jnp.array([0.1, 0.5, 0.9]))
  a, b = router.apply(params, x), router.apply(params, x, ctx)
  np.testing.assert_array_equal(a.weight_TK, b.weight_TK)
  np.testing.assert_array_equal(a.expert_index_TK, b.expert_index_TK)


def test_token_choice_capacity_rounds_fractions_up():
  # C = ceil(cf * S * K / E), worked by hand:
  assert token_choice_capacity(10, 2, 8, 1.25) == 4    # 25 / 8 = 3.125 -> 4
  assert token_choice_capacity(6, 1, 4, 1.0) == 2      # 6 / 4 = 1.5 -> 2
  assert token_choice_capacity(7, 2, 4, 1.0) == 4      # 14 / 4 = 3.5 -> 4
  assert token_choice_capacity(8, 2, 4, 1.0) == 4      # exactly 4
  assert token_choice_capacity(10, 1, 11, 1.1) == 1    # 11 / 11 = 1, despite float noise
  assert token_choice_capacity(3, 1, 4, 0.5) == 1      # 0.375 -> 1 (never below 1)
  assert token_choice_capacity(6, 1, 4, 1.0, min_capacity=3) == 3
  assert token_choice_capacity(4, 2, 2, 2.0) == 4      # 8 -> clipped to S = 4


def test_expert_choice_capacity_rounds_to_nearest():
  # C = round(cf * S / E), clipped to [max(min_capacity, 1), S].
  assert expert_choice_capacity(6, 4, 1.0) == 2        # 1.5 -> 2
  assert expert_choice_capacity(13, 4, 1.0) == 3       # 3.25 -> 3
  assert expert_choice_capacity(11, 4, 1.0) == 3       # 2.75 -> 3
  assert expert_choice_capacity(3, 8, 1.0) == 1        # 0.375 -> 0 -> at least 1
  assert expert_choice_capacity(4, 2, 4.0) == 4        # 8 -> clipped to S


def test_einsum_keeps_every_slot_when_fractional_capacity_rounds_up():
  # S=6 tokens, K=1, E=4, cf=1: C = ceil(1.5) = 2. Experts 0 and 1 get two tokens
  # each, so all six fit (C = floor(1.5) = 1 would drop tokens 1 and 3).
  x = jax.random.normal(jax.random.key(0), (6, D_SMALL))
  experts = random_experts(jax.random.key(1), num_experts=4, d=D_SMALL, f=8)
  index = jnp.array([[0], [0], [1], [1], [2], [3]], jnp.int32)
  weight = jnp.array([[0.9], [0.8], [0.7], [0.6], [0.5], [0.4]])
  d = RoutingDecision(expert_index_TK=index, weight_TK=weight)
  y, metrics = get_dispatcher("einsum")(x, d, experts, CapacityOptions(1.0, group_size=6))
  assert float(metrics["dropped_fraction"]) == 0.0
  want = reference.np_moe(x, index, weight, np.ones((6, 1), bool), experts)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_top_k_padding_gets_no_expert_and_no_say_in_aux_losses():
  # Token 2 is padding. Real tokens 0, 1 pick e0,e1 and e2,e1 (as above).
  mask = jnp.array([True, True, False])
  d = _route(TopKRouter(num_experts=3, k=2), np.log(P_TOP_K) + C_T[:, None], token_mask_T=mask)
  np.testing.assert_array_equal(d.mask_TK, [[1, 1], [1, 1], [0, 0]])
  # f = [1, 2, 1] / 4; P = mean of rows 0, 1 = [0.3, 0.25, 0.45];
  # load balance = 3 * (0.3 + 0.5 + 0.45) / 4 = 0.9375.
  np.testing.assert_allclose(d.aux["expert_load_E"], [0.25, 0.5, 0.25], rtol=1e-5)
  np.testing.assert_allclose(d.aux["load_balance_loss"], 0.9375, rtol=1e-5)
  np.testing.assert_allclose(d.aux["z_loss"], (1 + 4) / 2, rtol=1e-5)
  h = -(P_TOP_K[:2] * np.log(P_TOP_K[:2])).sum(1).mean()
  np.testing.assert_allclose(d.aux["router_entropy"], h, rtol=1e-5)


def test_expert_choice_ignores_padding_and_counts_capacity_from_real_tokens():
  # T=4, E=2, cf=1; tokens 2, 3 are padding with the strongest scores.
  # Unmasked: C = round(4 / 2) = 2 and the experts would take tokens 2, 0 and 3, 1.
  # Masked: C = round(2 real / 2) = 1: e0 -> token 0 (0.6), e1 -> token 1 (0.7).
  p = np.array([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1], [0.2, 0.8]])
  c = np.array([1.0, 2.0, 5.0, 7.0])  # z-loss sees only the real tokens' 1 and 2
  mask = jnp.array([True, True, False, False])
  d = _route(ExpertChoiceRouter(num_experts=2, capacity_factor=1.0), np.log(p) + c[:, None],
             token_mask_T=mask)
  np.testing.assert_array_equal(d.mask_TK, [[1, 0], [0, 1], [0, 0], [0, 0]])
  np.testing.assert_allclose(d.weight_TK, [[0.6, 0], [0, 0.7], [0, 0], [0, 0]], rtol=1e-5)
  assert float(d.aux["dropped_fraction"]) == 0.0
  np.testing.assert_allclose(d.aux["z_loss"], 2.5, rtol=1e-5)
  np.testing.assert_allclose(d.aux["expert_load_E"], [0.5, 0.5], rtol=1e-5)


def test_routers_reject_a_token_mask_of_the_wrong_shape():
  with pytest.raises(ValueError, match=r"token_mask_T has shape \(2,\); expected \[tokens\]"):
    _route(TopKRouter(num_experts=3, k=1), np.log(P_TOP_K), token_mask_T=jnp.ones(2, bool))


def test_batch_priority_is_the_top_router_probability_not_the_renormalised_weight():
  # Renormalised, token 0's top weight is 0.625 but its router probability is 0.5; with
  # k=1 every renormalised weight would be 1 and priority would be token order.
  for k in (1, 2):
    d = _route(TopKRouter(num_experts=3, k=k, batch_priority=True), np.log(P_TOP_K))
    np.testing.assert_allclose(d.priority_T, [0.5, 0.7, 0.6], rtol=1e-5)


def test_a_single_slot_is_gated_by_its_probability():
  d = _route(TopKRouter(num_experts=3, k=1, renormalize=True), np.log(P_TOP_K))
  np.testing.assert_allclose(d.weight_TK[:, 0], [0.5, 0.7, 0.6], rtol=1e-5)


@pytest.mark.parametrize("cfg", [
    dict(router=dict(name="top_k", k=1)),
    dict(router=dict(name="top_k", k=2)),
    dict(router=dict(name="top_k", k=2, renormalize=False)),
    dict(router="expert_choice"),
], ids=["top1", "top2", "top2_raw", "expert_choice"])
def test_every_shipped_router_setting_gets_task_gradient(cfg):
  """d(task loss)/d(router weights) without aux losses must not vanish."""
  layer = MoELayer(MoEConfig(num_experts=4, expert_hidden_dim=8, load_balance_weight=0.0,
                             z_loss_weight=0.0, **cfg))
  x = jax.random.normal(jax.random.key(0), (2, 6, 8))
  params = layer.init(jax.random.key(1), x)["params"]
  grad = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2))(params)
  assert float(jnp.abs(grad["router"]["w_DE"]).max()) > 1e-3


def test_jitter_without_its_rng_is_a_one_line_error():
  router = TopKRouter(num_experts=3, k=1, jitter=0.1)
  x = jnp.ones((3, 3))
  params = {"params": {"w_DE": jnp.eye(3)}}
  with pytest.raises(ValueError, match=r"jitter=0.1 while training needs a 'jitter' rng"):
    router.apply(params, x, deterministic=False)


def test_numpy_scalars_are_accepted_as_config_values():
  cfg = MoEConfig(num_experts=np.int64(4), capacity_factor=np.float32(1.5),
                  router=dict(name="top_k", k=np.int64(2), jitter=np.float64(0.1)))
  assert cfg.num_experts == 4 and cfg.router.get("k") == 2


# Sigmoid scores worked by hand: sigmoid(ln 9) = 0.9, sigmoid(ln 3) = 0.75,
# sigmoid(0) = 0.5, sigmoid(-ln 3) = 0.25.
SIG = np.log(np.array([[3.0, 1.0, 1 / 3, 9.0],     # scores [0.75, 0.5, 0.25, 0.9]
                       [1 / 3, 9.0, 1.0, 3.0]]))   # scores [0.25, 0.9, 0.5, 0.75]


def test_sigmoid_scores_renormalised_and_scaled():
  d = _route(TopKRouter(num_experts=4, k=2, score="sigmoid", routed_scaling_factor=2.5), SIG)
  # token 0: top-2 = e3 (0.9), e0 (0.75) -> 2.5 * [0.9, 0.75] / 1.65
  # token 1: top-2 = e1 (0.9), e3 (0.75) -> the same weights
  np.testing.assert_array_equal(d.expert_index_TK, [[3, 0], [1, 3]])
  np.testing.assert_allclose(d.weight_TK, [[2.5 * 0.9 / 1.65, 2.5 * 0.75 / 1.65]] * 2, rtol=1e-5)
  raw = _route(TopKRouter(num_experts=4, k=2, score="sigmoid", renormalize=False), SIG)
  np.testing.assert_allclose(raw.weight_TK, [[0.9, 0.75], [0.9, 0.75]], rtol=1e-5)
  # Aux losses see scores normalised per token (each row sums to 2.4):
  # P = ([0.75, 0.5, 0.25, 0.9] + [0.25, 0.9, 0.5, 0.75]) / 2 / 2.4 = [1, 1.4, 0.75, 1.65] / 4.8
  # f = assignments [1, 1, 0, 2] / 4; load balance = 4 * (1 + 1.4 + 0 + 3.3) / 19.2.
  np.testing.assert_allclose(d.aux["load_balance_loss"], 4 * 5.7 / 19.2, rtol=1e-5)


def test_group_limited_top_k_keeps_the_best_groups_by_top_two_sum():
  # Groups {e0, e1} and {e2, e3}; topk_group=1.
  # token 0: group sums 0.75 + 0.5 = 1.25 vs 0.9 + 0.25 = 1.15 -> group 0 -> e0, e1
  #   (plain top-2 would take e3, e0: the best single expert is in the losing group);
  # token 1: 0.9 + 0.25 = 1.15 vs 0.75 + 0.5 = 1.25 -> group 1 -> e3, e2.
  d = _route(TopKRouter(num_experts=4, k=2, score="sigmoid", n_group=2, topk_group=1), SIG)
  np.testing.assert_array_equal(d.expert_index_TK, [[0, 1], [3, 2]])
  np.testing.assert_allclose(d.weight_TK, [[0.6, 0.4], [0.6, 0.4]], rtol=1e-5)
  both = _route(TopKRouter(num_experts=4, k=2, score="sigmoid", n_group=2, topk_group=2), SIG)
  np.testing.assert_array_equal(both.expert_index_TK, [[3, 0], [1, 3]])  # all groups kept


@pytest.mark.parametrize("router, message", [
    (dict(n_group=3), r"n_group=3 does not divide num_experts=4"),
    (dict(n_group=2, topk_group=3), r"topk_group=3 is out of range; allowed: 1 <= topk_group <= 2"),
    (dict(k=3, n_group=2, topk_group=1), r"k=3 is more than the 2 experts in the kept groups"),
    (dict(score="tanh"), r"score='tanh' is not supported; allowed: 'softmax', 'sigmoid'"),
    (dict(fused=True, score="sigmoid"), r"fused=True runs the softmax top-k kernel"),
    (dict(routed_scaling_factor=0), r"routed_scaling_factor=0 must be a number > 0"),
])
def test_top_k_rejects_inconsistent_group_and_score_options(router, message):
  with pytest.raises(ValueError, match=message):
    MoEConfig(num_experts=4, router=dict(name="top_k", **{"k": 2, **router}))


def test_balance_loss_counts():
  # P_TOP_K: slot assignments e0 <- t0, t2; e1 <- t0, t1, t2; e2 <- t1; P = [0.85, 1.1, 1.05] / 3.
  route = lambda count: _route(TopKRouter(num_experts=3, k=2, balance_count=count),
                               np.log(P_TOP_K)).aux["load_balance_loss"]
  np.testing.assert_allclose(route("slots"), 6.05 / 6, rtol=1e-5)   # f = [2, 3, 1] / 6
  # top1: first choices t0 -> e0, t1 -> e2, t2 -> e1: f = [1, 1, 1] / 3 -> 3 * 3 / 9
  np.testing.assert_allclose(route("top1"), 1.0, rtol=1e-5)
  np.testing.assert_allclose(route("hf"), 2 * 6.05 / 6, rtol=1e-5)  # k times "slots"


# Two sequences of two tokens, k=2: sequence A (t0, t1) and B (t2, t3).
P4 = np.array([[0.5, 0.3, 0.2],    # -> e0, e1
               [0.1, 0.2, 0.7],    # -> e2, e1
               [0.6, 0.3, 0.1],    # -> e0, e1
               [0.7, 0.1, 0.2]])   # -> e0, e2


def test_balance_loss_per_sequence_and_over_the_batch():
  # A: f = [1, 2, 1] / 4, P = [0.3, 0.25, 0.45]: 3 * (0.3 + 0.5 + 0.45) / 4 = 0.9375
  # B: f = [2, 1, 1] / 4, P = [0.65, 0.2, 0.15]: 3 * (1.3 + 0.2 + 0.15) / 4 = 1.2375
  seq = _route(TopKRouter(num_experts=3, k=2, balance_scope="sequence", sequence_length=2),
               np.log(P4))
  np.testing.assert_allclose(seq.aux["load_balance_loss"], (0.9375 + 1.2375) / 2, rtol=1e-5)
  # Batch: f = [3, 3, 2] / 8, P = [1.9, 0.9, 1.2] / 4: 3 * (5.7 + 2.7 + 2.4) / 32
  batch = _route(TopKRouter(num_experts=3, k=2), np.log(P4))
  np.testing.assert_allclose(batch.aux["load_balance_loss"], 3 * 10.8 / 32, rtol=1e-5)


def test_sequence_balance_needs_sequences():
  with pytest.raises(ValueError, match="balance_scope='sequence' needs a \\[batch, seq, d_model\\]"):
    _route(TopKRouter(num_experts=3, k=2, balance_scope="sequence"), np.log(P4))


def test_balance_loss_per_routing_group_is_the_micro_batch_loss():
  # group_size=2 splits P4 like the two sequences above: the mean of 0.9375 and 1.2375.
  grp = _route(TopKRouter(num_experts=3, k=2, balance_scope="group", group_size=2), np.log(P4))
  np.testing.assert_allclose(grp.aux["load_balance_loss"], (0.9375 + 1.2375) / 2, rtol=1e-5)
  whole = _route(TopKRouter(num_experts=3, k=2, balance_scope="group"), np.log(P4))
  np.testing.assert_allclose(whole.aux["load_balance_loss"], 3 * 10.8 / 32, rtol=1e-5)
