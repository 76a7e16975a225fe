"""Properties over random shapes (hypothesis): routing + capacity + dispatch invariants."""
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_jax import (CapacityOptions, ExpertChoiceRouter, TopKRouter, assign_capacity_slots,
                     get_dispatcher)
from tests import reference
from tests.nn.test_dispatch import random_experts

D = 4


@st.composite
def routing_cases(draw):
  E = draw(st.integers(1, 6))
  K = draw(st.integers(1, E))
  S = draw(st.integers(1, 6))  # group size
  G = draw(st.integers(1, 3))
  cf = draw(st.sampled_from([0.25, 0.5, 1.0, 1.25, 2.0]))
  priority = draw(st.booleans())
  seed = draw(st.integers(0, 2**16))
  return E, K, S, G, cf, priority, seed


@settings(max_examples=20, deadline=None)
@given(routing_cases())
def test_top_k_with_capacity_properties(case):
  E, K, S, G, cf, priority, seed = case
  T = S * G
  kx, kr, ke = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (T, D))
  router = TopKRouter(num_experts=E, k=K, batch_priority=priority)
  experts = random_experts(ke, num_experts=E, d=D, f=4)

  @jax.jit  # one compile per example instead of one per op
  def route_and_dispatch(x):
    decision = router.apply(router.init(kr, x), x)
    y, metrics = get_dispatcher("einsum")(x, decision, experts,
                                          CapacityOptions(cf, group_size=S, min_capacity=1))
    return decision, y, metrics, assign_capacity_slots(decision, E, S, C)[1]

  # Capacity in exact arithmetic, independently of token_choice_capacity: ceil(cf*S*K/E).
  C = min(max(math.ceil(Fraction(str(cf)) * S * K / E), 1), S)
  decision, y, metrics, keep = route_and_dispatch(x)
  assert np.all(np.isfinite(y))
  # Each expert takes at most C slots per group.
  per_group = np.zeros((G, E), int)
  for t, k in zip(*np.nonzero(np.asarray(keep))):
    per_group[t // S, int(decision.expert_index_TK[t, k])] += 1
  assert per_group.max() <= C
  # Dropped fraction is the capacity arithmetic; the kept set matches the reference.
  want_keep = reference.np_capacity_keep(decision.expert_index_TK, np.ones((T, K), bool), S, C,
                                         decision.priority_T)
  np.testing.assert_array_equal(keep, want_keep)
  np.testing.assert_allclose(metrics["dropped_fraction"], 1 - want_keep.mean(), atol=1e-6)
  # Combine weights per token sum to <= 1 (renormalised top-k, minus drops).
  combine_T = np.where(keep, decision.weight_TK, 0).sum(1)
  assert np.all(combine_T <= 1 + 1e-5)
  want = reference.np_moe(x, decision.expert_index_TK, decision.weight_TK, want_keep, experts)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(routing_cases())
def test_expert_choice_properties(case):
  E, _, S, G, cf, _, seed = case
  T = S * G
  kx, kr = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (T, D))
  router = ExpertChoiceRouter(num_experts=E, capacity_factor=cf, group_size=S)
  experts = random_experts(kr, num_experts=E, d=D, f=4)

  @jax.jit
  def route_and_dispatch(x):
    d = router.apply(router.init(kr, x), x)
    return d, [get_dispatcher(name)(x, d, experts)[0] for name in ("sorted", "einsum")]

  d, ys = route_and_dispatch(x)
  mask = np.asarray(d.mask_TK).reshape(G, S, E)
  # Every expert takes exactly C tokens in every group.
  np.testing.assert_array_equal(mask.sum(1), d.capacity)
  assert d.capacity == min(max(int(round(cf * S / E)), 1), S)
  # Softmax scores: a token's combine weights sum to <= 1.
  assert np.all(np.asarray(d.weight_TK).sum(1) <= 1 + 1e-5)
  np.testing.assert_allclose(d.aux["dropped_fraction"], 1 - mask.any(-1).mean(), atol=1e-6)
  for y in ys:
    assert np.all(np.isfinite(y))
  np.testing.assert_allclose(ys[0], ys[1], rtol=1e-4, atol=1e-5)  # dropless == roomy einsum
