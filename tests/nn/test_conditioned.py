"""Conditioned routing against numpy: per-task gates, token + noise-level gates, and the
condition-only expert cache (cached == uncached, FLOPs saved)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import Context, MoEConfig, MoELayer
from moe_jax.nn.routing import ConditionedRouter, condition_router_flops
from moe_jax.nn.routing.conditioned import sinusoidal_features

T, D, E = 6, 4, 4
X = np.asarray(jax.random.normal(jax.random.key(0), (T, D)))


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _top1(logits):
  p = _softmax(logits)
  return p.argmax(-1), p.max(-1)


def test_per_task_gates_use_each_tokens_task():
  router = ConditionedRouter(num_experts=E, k=1, on="task_id", gate="per_value", num_values=3)
  ctx = Context(task_id=jnp.array([0, 1, 2, 2, 1, 0]))
  params = router.init(jax.random.key(1), jnp.asarray(X), ctx)
  d = router.apply(params, jnp.asarray(X), ctx)
  w = np.asarray(params["params"]["w_per_value_DE"])
  logits = np.stack([X[t] @ w[int(ctx.task_id[t])] for t in range(T)])
  index, weight = _top1(logits)
  np.testing.assert_array_equal(d.expert_index_TK[:, 0], index)
  np.testing.assert_allclose(d.weight_TK[:, 0], weight, rtol=1e-5)


def test_token_and_noise_level_gate():
  router = ConditionedRouter(num_experts=E, k=1, on="noise_level", gate="token_and_condition",
                             embed_dim=6)
  ctx = Context(noise_level=jnp.array([0.1, 0.5, 3.0, 10.0, 0.0, 7.0]))
  params = router.init(jax.random.key(2), jnp.asarray(X), ctx)
  d = router.apply(params, jnp.asarray(X), ctx)
  p = params["params"]
  level = np.asarray(ctx.noise_level)
  freq = np.exp(-np.log(10_000.0) * np.arange(3) / 3)
  u = np.concatenate([np.sin(level[:, None] * freq), np.cos(level[:, None] * freq)], -1)
  logits = X @ np.asarray(p["w_DE"]) + u @ np.asarray(p["w_cond_UE"])
  index, weight = _top1(logits)
  np.testing.assert_array_equal(d.expert_index_TK[:, 0], index)
  np.testing.assert_allclose(d.weight_TK[:, 0], weight, rtol=1e-5)
  np.testing.assert_allclose(sinusoidal_features(jnp.asarray(level), 6), u, rtol=1e-5, atol=1e-6)


def test_condition_only_expert_cache_equals_per_token_gate():
  cfg = lambda cache: MoEConfig(num_experts=E, expert_hidden_dim=8, dispatch="sorted",
                                router=dict(name="conditioned", k=2, on="task_id", num_values=5,
                                            gate="condition_only", cache=cache))
  x = jax.random.normal(jax.random.key(3), (3, 4, D))
  ctx = Context(task_id=jnp.array([4, 0, 4]))
  plain, cached = MoELayer(cfg(False)), MoELayer(cfg(True))
  params = plain.init(jax.random.key(4), x, context=ctx)["params"]
  assert jax.tree.structure(params) == jax.tree.structure(
      cached.init(jax.random.key(4), x, context=ctx)["params"])
  loss = lambda layer: lambda p: jnp.sum(layer.apply({"params": p}, x, context=ctx) ** 2)
  (l0, g0), (l1, g1) = (jax.value_and_grad(loss(m))(params) for m in (plain, cached))
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Gate FLOPs: 12 tokens x 16 x 4 x 2 per token vs 5 ids once.
  flops = condition_router_flops(num_tokens=12, num_values=5, cond_dim=16, num_experts=E)
  assert flops == {"uncached": 1536, "cached": 640}


def test_condition_only_routes_equal_conditions_alike():
  router = ConditionedRouter(num_experts=E, k=2, on="task_id", gate="condition_only",
                             num_values=3, cache=True)
  ctx = Context(task_id=jnp.array([2, 2, 0, 2, 0, 1]))
  params = router.init(jax.random.key(5), jnp.asarray(X), ctx)
  d = router.apply(params, jnp.asarray(X), ctx)
  idx = np.asarray(d.expert_index_TK)
  np.testing.assert_array_equal(idx[0], idx[1])
  np.testing.assert_array_equal(idx[0], idx[3])
  np.testing.assert_array_equal(idx[2], idx[4])


@pytest.mark.parametrize("router, message", [
    (dict(on="noise_level", gate="per_value"), r"gate='per_value' needs an id"),
    (dict(on="task_id", num_values=0), r"num_values=0 is out of range"),
    (dict(on="task_id", num_values=3, gate="per_value", cache=True),
     r"cache=True needs gate='condition_only' on an id"),
    (dict(on="lang"), r"on='lang' is not supported"),
])
def test_conditioned_router_rejects_bad_options(router, message):
  with pytest.raises(ValueError, match=message):
    MoEConfig(num_experts=E, router=dict(name="conditioned", k=1, **router))


def test_missing_context_field_is_a_one_line_error():
  router = ConditionedRouter(num_experts=E, k=1, on="modality_id", num_values=2)
  with pytest.raises(ValueError, match=r"routes on context.modality_id, which the model did not"):
    router.init(jax.random.key(0), jnp.asarray(X), Context(task_id=jnp.zeros(T, jnp.int32)))
