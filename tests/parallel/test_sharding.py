"""Meshes and expert parallelism on 8 simulated CPU devices (see conftest's XLA_FLAGS)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax import CapacityOptions, ExpertChoiceRouter, get_dispatcher
from moe_jax.parallel.expert_parallel import expert_parallel_ffn
from moe_jax.parallel.ragged_exchange import ragged_exchange
from moe_jax.parallel.sharding import initialize_distributed, logical_to_spec, make_mesh
from tests import reference
from tests.nn.test_dispatch import random_decision, random_experts

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
T, D, F, E, K = 64, 8, 16, 8, 2


@needs_8
def test_mesh_shape_and_errors():
  mesh = make_mesh({"data": 2, "expert": 4})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "model": 1}
  with pytest.raises(ValueError, match=r"mesh data=2 x fsdp=1 x expert=2 x model=1 needs 4 "
                                       r"devices but 8 are available"):
    make_mesh({"data": 2, "expert": 2})
  with pytest.raises(ValueError, match=r"unknown mesh axes \['experts'\]"):
    make_mesh({"experts": 8})
  with pytest.raises(ValueError, match=r"mesh.model=0 must be >= 1"):
    make_mesh({"data": 8, "model": 0})


def test_initialize_distributed_rejects_a_bad_process_id(monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  monkeypatch.setenv("JAX_PROCESS_ID", "first")
  with pytest.raises(ValueError, match=r"JAX_PROCESS_ID='first' must be a non-negative integer"):
    initialize_distributed()


def test_logical_rules_and_single_host_init():
  assert logical_to_spec(("batch", None, "embed")) == P(("data", "fsdp", "expert"), None, "fsdp")
  with pytest.raises(ValueError, match="logical axis 'time' has no rule"):
    logical_to_spec(("time",))
  assert initialize_distributed() is False  # one process: nothing to join


def _ep(mesh, cf=8.0, **kw):
  return jax.jit(functools.partial(expert_parallel_ffn, mesh=mesh, capacity_factor=cf, **kw))


def _inputs(seed, t=T, masked=True):
  kx, ke, kd, kc = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(kx, (t, D)), random_experts(ke, num_experts=E, d=D, f=F),
          random_decision(kd, t=t, num_experts=E, k=K, masked=masked),
          jax.random.normal(kc, (t, D)))


def _check_against_loop(fn, x, decision, experts, cot, keep=None):
  """Output vs the float64 loop over experts; grads (x, weights, experts) vs the jnp loop."""
  keep = decision.valid_TK() if keep is None else keep
  y = fn(x, decision, experts)[0]
  y_ref = reference.np_moe(x, decision.expert_index_TK, decision.weight_TK, keep, experts)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
  loss = lambda f, x, w, ex: jnp.sum(f(x, w, ex) * cot)
  ep = lambda x, w, ex: fn(x, decision.replace(weight_TK=w), ex)[0]
  loop = lambda x, w, ex: reference.jnp_loop_moe(x, decision.expert_index_TK, w, keep, ex)
  args = (x, decision.weight_TK, experts)
  g_ep = jax.grad(functools.partial(loss, ep), argnums=(0, 1, 2))(*args)
  g_ref = jax.grad(functools.partial(loss, loop), argnums=(0, 1, 2))(*args)
  for a, b in zip(jax.tree.leaves(g_ep), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@needs_8
@pytest.mark.parametrize("mode, local", [("capacity", "einsum"), ("capacity", "sorted"),
                                         ("dropless", "einsum"), ("dropless", "sorted"),
                                         ("dropless", "tiled")])
def test_expert_parallel_equals_loop_reference_outputs_and_gradients(mode, local):
  # T=60 does not split over 8 token shards: exercises the padding too.
  x, experts, decision, cot = _inputs(0, t=60)
  fn = _ep(make_mesh({"data": 2, "expert": 4}), mode=mode, local_dispatch=local)
  # Roomy capacity: every valid slot ran, no masked one did.
  np.testing.assert_array_equal(fn(x, decision, experts)[1], decision.valid_TK())
  _check_against_loop(fn, x, decision, experts, cot)


@needs_8
@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_expert_parallel_pallas_local_experts(mode):
  # Interpret mode on CPU is slow: few tokens, forward and backward once.
  x, experts, decision, cot = _inputs(1, t=16)
  fn = _ep(make_mesh({"data": 2, "expert": 4}), mode=mode, local_dispatch="pallas")
  _check_against_loop(fn, x, decision, experts, cot)


@needs_8
@pytest.mark.parametrize("local", ["einsum", "sorted"])
def test_expert_parallel_capacity_drops_like_einsum_per_device_groups(local):
  mesh = make_mesh({"data": 2, "expert": 4})
  x, experts, decision, _ = _inputs(2, masked=False)
  y, kept = _ep(mesh, 0.5, mode="capacity", local_dispatch=local)(x, decision, experts)
  # 8 token shards of 8 tokens: the same as einsum with groups of 8.
  C = 1  # ceil(0.5 * 8 tokens * 2 slots / 8 experts)
  keep = reference.np_capacity_keep(decision.expert_index_TK, decision.valid_TK(), T // 8, C)
  assert 0 < keep.sum() < keep.size
  np.testing.assert_array_equal(kept, keep)  # exactly the slots the reference keeps
  y_ref = reference.np_moe(x, decision.expert_index_TK, decision.weight_TK, keep, experts)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
  y_einsum, _ = get_dispatcher("einsum")(x, decision, experts,
                                         CapacityOptions(capacity_factor=0.5, group_size=T // 8))
  np.testing.assert_allclose(y, y_einsum, rtol=1e-5, atol=1e-5)


@needs_8
@pytest.mark.parametrize("mode", ["auto", "dropless"])
def test_expert_parallel_expert_choice_equals_single_device(mode):
  """Router-enforced capacity per group of S: exact on the mesh, groups kept whole."""
  x, experts, _, _ = _inputs(3)
  router = ExpertChoiceRouter(num_experts=E, capacity_factor=1.0, group_size=4)
  decision = router.apply(router.init(jax.random.key(0), x), x)
  y, kept = _ep(make_mesh({"data": 2, "expert": 4}), mode=mode)(x, decision, experts)
  y_ref, _ = get_dispatcher("einsum")(x, decision, experts)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(kept, decision.valid_TK())  # the router's picks all ran


def _np_ragged_all_to_all(operands, outputs, in_off, send, out_off):
  """numpy model of jax.lax.ragged_all_to_all's documented semantics, over devices."""
  outputs = [o.copy() for o in outputs]
  for i, op in enumerate(operands):
    for j in range(len(operands)):
      rows = op[in_off[i][j]:in_off[i][j] + send[i][j]]
      outputs[j][out_off[i][j]:out_off[i][j] + send[i][j]] = rows
  return outputs


@needs_8
def test_ragged_exchange_emulation_matches_ragged_all_to_all_semantics():
  N, M = 8, 3
  X, Y = N * M, N * M + 3
  rng = np.random.default_rng(0)
  send = rng.integers(0, M + 1, (N, N))  # send[i, j]: rows device i sends device j
  in_off = np.cumsum(send, 1) - send
  out_off = np.cumsum(send, 0) - send + 1  # receivers leave row 0 untouched
  operand = rng.normal(size=(N, X, 2)).astype(np.float32)
  output = np.full((N, Y, 2), -7.0, np.float32)  # rows nobody writes keep this
  mesh = make_mesh({"expert": 8})
  fn = jax.shard_map(
      lambda op, out, a, b, c, d: ragged_exchange(op[0], out[0], a[0], b[0], c[0], d[0],
                                                  axis_name="expert", max_rows=M,
                                                  ragged=False)[None],
      mesh=mesh, in_specs=P("expert"), out_specs=P("expert"))
  got = jax.jit(fn)(operand, output, in_off.astype(np.int32), send.astype(np.int32),
                    out_off.astype(np.int32), send.T.astype(np.int32))
  want = _np_ragged_all_to_all(list(operand), list(output), in_off, send, out_off)
  np.testing.assert_array_equal(got, np.stack(want))


@needs_8
def test_dropless_ragged_path_lowers_forward_and_backward():
  """The GPU/TPU path (jax.lax.ragged_all_to_all): XLA:CPU cannot run it, so lower only."""
  x, experts, decision, _ = _inputs(4)
  mesh = make_mesh({"data": 2, "expert": 4})
  loss = lambda x, ex: jnp.sum(expert_parallel_ffn(x, decision, ex, mesh, mode="dropless",
                                                   local_dispatch="sorted", ragged=True)[0])
  hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, experts).as_text()
  assert hlo.count("ragged_all_to_all") == 4  # two exchanges forward, their transposes back


@needs_8
def test_expert_parallel_rejects_bad_input():
  mesh = make_mesh({"data": 2, "expert": 4})
  experts = random_experts(jax.random.key(0), num_experts=6, d=D, f=F)
  with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by mesh.expert=4"):
    expert_parallel_ffn(jnp.ones((T, D)), random_decision(jax.random.key(1), t=T, num_experts=6),
                        experts, mesh, capacity_factor=1.0)
  x, experts, decision, _ = _inputs(5)
  with pytest.raises(ValueError, match=r"expert_parallel='ragged' is not supported; allowed: "
                                       r"'auto', 'capacity', 'dropless'"):
    expert_parallel_ffn(x, decision, experts, mesh, mode="ragged")
