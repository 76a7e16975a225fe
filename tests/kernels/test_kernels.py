"""kernels_pallas against plain-JAX references (interpret mode on CPU), forward and backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.gmm import fit_block, gmm, grouped_matmul, tgmm
from kernels_pallas.reference import combine_reference as combine
from kernels_pallas.reference import gmm_reference, tgmm_reference
from kernels_pallas.reference import permute_reference as permute
from kernels_pallas.reference import unpermute_reference as unpermute
from kernels_pallas.tiling import make_tile_layout, padded_rows

INTERPRET = jax.default_backend() == "cpu"


def _layout(expert, valid, E, bm):
  return make_tile_layout(jnp.asarray(expert, jnp.int32), jnp.asarray(valid), E, bm)


def test_tile_layout_by_hand():
  # E=3, block 2. Slots' experts: [2, 0, 2, 2, 0] (slot 4 unused) -> e0 gets slot 1 (1 row,
  # padded to 2), e1 nothing, e2 slots 0, 2, 3 (3 rows, padded to 4).
  L = _layout([2, 0, 2, 2, 0], [1, 1, 1, 1, 0], 3, 2)
  assert L.num_rows == padded_rows(5, 3, 2) == 8
  np.testing.assert_array_equal(L.row_slot_R, [1, -1, 0, 2, 3, -1, -1, -1])
  np.testing.assert_array_equal(L.slot_row_X, [2, 0, 3, 4, 8])
  np.testing.assert_array_equal(L.tile_expert_I, [0, 2, 2, -1])
  np.testing.assert_array_equal(L.tile_start_E, [0, 1, 1])
  np.testing.assert_array_equal(L.tile_end_E, [1, 1, 3])


def test_permute_unpermute_round_trip_and_gradient_is_a_gather():
  x = jax.random.normal(jax.random.key(0), (3, 4))  # T=3 tokens, K=2 slots each
  L = _layout([1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], 2, 4)
  x_RD = permute(x, L, 2)
  back = unpermute(x_RD, L).reshape(3, 2, 4)
  np.testing.assert_array_equal(back, jnp.stack([x, x], 1))
  g = jax.grad(lambda x: jnp.sum(permute(x, L, 2) ** 2))(x)
  np.testing.assert_allclose(g, 2 * 2 * x, rtol=1e-6)  # each token sits in 2 rows


@st.composite
def layouts(draw):
  E = draw(st.integers(1, 5))
  X = draw(st.integers(1, 40))
  bm = draw(st.sampled_from([4, 8, 16]))
  case = draw(st.sampled_from(["random", "one_expert_takes_all", "some_unused"]))
  seed = draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  expert = rng.integers(0, E, X)
  valid = np.ones(X, bool)
  if case == "one_expert_takes_all":
    expert[:] = E - 1  # every other expert is empty
  elif case == "some_unused":
    valid = rng.random(X) < 0.6
  return E, X, bm, expert, valid, seed


@settings(max_examples=8, deadline=None)
@given(layouts(), st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_gmm_and_tgmm_match_reference(case, dtype):
  E, X, bm, expert, valid, seed = case
  L = _layout(expert, valid, E, bm)
  K, N = 16, 24  # N is not a power of two: blocks shrink to 8
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(k1, (L.num_rows, K)).astype(dtype)
  rhs = jax.random.normal(k2, (E, K, N)).astype(dtype)
  grad = jax.random.normal(k3, (L.num_rows, N)).astype(dtype)
  tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
  f32 = lambda a: np.asarray(a, np.float32)
  out = gmm(lhs, rhs, L.tile_expert_I, block_m=bm, interpret=INTERPRET)
  np.testing.assert_allclose(f32(out), f32(gmm_reference(lhs, rhs, L.tile_expert_I, bm)), **tol)
  out_t = gmm(grad, rhs, L.tile_expert_I, block_m=bm, transpose_rhs=True, interpret=INTERPRET)
  np.testing.assert_allclose(
      f32(out_t), f32(gmm_reference(grad, rhs, L.tile_expert_I, bm, transpose_rhs=True)), **tol)
  d_rhs = tgmm(lhs, grad, L.tile_start_E, L.tile_end_E, num_experts=E, block_m=bm,
               interpret=INTERPRET)
  np.testing.assert_allclose(f32(d_rhs), f32(tgmm_reference(lhs, grad, L.tile_expert_I, E, bm)),
                             **tol)
  # Empty experts get exactly zero weight gradient.
  for e in set(range(E)) - set(expert[valid].tolist()):
    assert not np.any(f32(d_rhs[e]))


def test_grouped_matmul_gradients_match_reference():
  E, bm = 3, 8
  L = _layout(np.array([0, 2, 2, 0, 2, 2, 2, 0, 2]), np.ones(9, bool), E, bm)
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  lhs = jax.random.normal(k1, (L.num_rows, 16))
  rhs = jax.random.normal(k2, (E, 16, 32))
  cot = jax.random.normal(k3, (L.num_rows, 32))
  ours = jax.grad(lambda a, b: jnp.sum(grouped_matmul(a, b, L, INTERPRET) * cot), (0, 1))
  ref = jax.grad(lambda a, b: jnp.sum(gmm_reference(a, b, L.tile_expert_I, bm) * cot), (0, 1))
  for a, b in zip(ours(lhs, rhs), ref(lhs, rhs)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fit_block():
  assert fit_block(14336, 128) == 128 and fit_block(24, 128) == 8 and fit_block(768, 512) == 256


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
def test_gmm_compiled_on_gpu_matches_reference():
  E, bm = 8, 128
  rng = np.random.default_rng(0)
  L = _layout(rng.integers(0, E, 3000), np.ones(3000, bool), E, bm)
  lhs = jax.random.normal(jax.random.key(0), (L.num_rows, 256)).astype(jnp.bfloat16)
  rhs = jax.random.normal(jax.random.key(1), (E, 256, 512)).astype(jnp.bfloat16)
  out = gmm(lhs, rhs, L.tile_expert_I, block_m=bm)
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(gmm_reference(lhs, rhs, L.tile_expert_I, bm), np.float32),
                             rtol=2e-2, atol=5e-1)


def test_tile_gather_matmul_matches_reference_with_gradients():
  from kernels_pallas.tile_gather import tile_gather_matmul
  E, bm = 4, 8
  L = _layout(np.array([3, 3, 0, 3, 1, 3, 3, 3, 0, 3]), np.array([1] * 9 + [0], bool), E, bm)
  k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
  lhs = jax.random.normal(k1, (L.num_rows, 8))
  rhs = jax.random.normal(k2, (E, 8, 12))
  cot = jax.random.normal(k3, (L.num_rows, 12))
  np.testing.assert_allclose(tile_gather_matmul(lhs, rhs, L),
                             gmm_reference(lhs, rhs, L.tile_expert_I, bm), rtol=1e-5, atol=1e-5)
  ours = jax.grad(lambda a, b: jnp.sum(tile_gather_matmul(a, b, L) * cot), (0, 1))(lhs, rhs)
  ref = jax.grad(lambda a, b: jnp.sum(gmm_reference(a, b, L.tile_expert_I, bm) * cot),
                 (0, 1))(lhs, rhs)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T, E, k, block_t", [(24, 6, 2, 8), (32, 4, 4, 16), (16, 8, 1, 16),
                                                (20, 5, 2, 64)])
def test_fused_router_matches_reference(T, E, k, block_t):
  from kernels_pallas.reference import top_k_router_reference
  from kernels_pallas.router import chosen_weights, fused_top_k_router
  logits = jax.random.normal(jax.random.key(T), (T, E)) * 2
  index, weight, position, counts = fused_top_k_router(logits, k=k, block_t=block_t,
                                                       interpret=INTERPRET)
  r_index, r_weight, r_position, r_counts = top_k_router_reference(logits, k)
  np.testing.assert_array_equal(index, r_index)
  np.testing.assert_allclose(weight, r_weight, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(position, r_position)
  np.testing.assert_array_equal(counts, r_counts)
  # Gradient to the logits through the weights equals autodiff of softmax -> top-k.
  cot = jax.random.normal(jax.random.key(1), (T, k))
  ours = jax.grad(lambda l: jnp.sum(fused_top_k_router(l, k=k, block_t=block_t,
                                                       interpret=INTERPRET)[1] * cot))(logits)
  def ref(l):
    w, _ = jax.lax.top_k(jax.nn.softmax(l), k)
    return jnp.sum(w / w.sum(-1, keepdims=True) * cot)
  np.testing.assert_allclose(ours, jax.grad(ref)(logits), rtol=1e-5, atol=1e-6)
  assert chosen_weights(logits, index, renormalize=False).shape == (T, k)


def test_layout_from_router_positions_equals_sorted_layout():
  from kernels_pallas.router import fused_top_k_router
  from kernels_pallas.tiling import layout_from_ranks
  T, E, k, bm = 40, 6, 2, 8
  logits = jax.random.normal(jax.random.key(3), (T, E))
  index, _, position, counts = fused_top_k_router(logits, k=k, block_t=8, interpret=INTERPRET)
  ours = layout_from_ranks(index.reshape(-1), position.reshape(-1), counts, bm)
  ref = _layout(index.reshape(-1), np.ones(T * k, bool), E, bm)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(a, b)


@settings(max_examples=4, deadline=None)
@given(layouts(), st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_permute_kernels_match_xla_gathers_with_gradients(case, dtype):
  from kernels_pallas.permute import permute_tokens, unpermute_combine
  E, X, bm, expert, valid, seed = case
  K = 2 if X % 2 == 0 else 1
  T = X // K
  L = _layout(expert, valid, E, bm)
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k1, (T, 16)).astype(dtype)
  y = jax.random.normal(k2, (L.num_rows, 16)).astype(dtype)
  w = jax.random.uniform(k3, (T, K))
  tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
  f32 = lambda a: np.asarray(a, np.float32)
  cot_R = jax.random.normal(k4, (L.num_rows, 16)).astype(dtype)
  cot_T = jax.random.normal(k4, (T, 16)).astype(dtype)
  loss = lambda f: lambda y, w: jnp.sum((f(y, w) * cot_T).astype(jnp.float32))
  ref = jax.grad(loss(lambda y, w: combine(y, L, w)), (0, 1))(y, w)
  g_ref = jax.grad(lambda x: jnp.sum((permute(x, L, K) * cot_R).astype(jnp.float32)))(x)
  for xla in (False, True):  # the Pallas kernel and the XLA gather behind the same VJPs
    perm = lambda x: permute_tokens(x, L, K, INTERPRET, xla=xla)
    comb = lambda y, w: unpermute_combine(y, L, w, INTERPRET, xla=xla)
    # Forward: equal to the plain gathers exactly (one product per term).
    np.testing.assert_array_equal(f32(perm(x)), f32(permute(x, L, K)))
    np.testing.assert_allclose(f32(comb(y, w)), f32(combine(y, L, w)), **tol)
    g_ours = jax.grad(lambda x: jnp.sum((perm(x) * cot_R).astype(jnp.float32)))(x)
    np.testing.assert_allclose(f32(g_ours), f32(g_ref), **tol)
    for a, b in zip(jax.grad(loss(comb), (0, 1))(y, w), ref):
      np.testing.assert_allclose(f32(a), f32(b), **tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_swiglu_matches_reference_with_gradients(dtype):
  from kernels_pallas.swiglu import grouped_swiglu
  E, bm = 4, 8
  # Expert 1 is empty; expert 3 takes most slots; 2 slots unused.
  L = _layout(np.array([3, 3, 0, 3, 2, 3, 3, 3, 0, 3, 3, 2]), np.array([1] * 10 + [0, 0], bool),
              E, bm)
  k1, k2, k3, k4 = jax.random.split(jax.random.key(7), 4)
  x = jax.random.normal(k1, (L.num_rows, 16)).astype(dtype)
  wg = (jax.random.normal(k2, (E, 16, 24)) / 4).astype(dtype)
  wu = (jax.random.normal(k3, (E, 16, 24)) / 4).astype(dtype)
  cot = jax.random.normal(k4, (L.num_rows, 24)).astype(dtype)

  def ref(x, wg, wu):
    g = gmm_reference(x, wg, L.tile_expert_I, bm).astype(jnp.float32)
    u = gmm_reference(x, wu, L.tile_expert_I, bm).astype(jnp.float32)
    return (jax.nn.silu(g) * u).astype(dtype)

  tol = dict(rtol=3e-2, atol=3e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
  f32 = lambda a: np.asarray(a, np.float32)
  np.testing.assert_allclose(f32(grouped_swiglu(x, wg, wu, L, INTERPRET)), f32(ref(x, wg, wu)),
                             **tol)
  loss = lambda f: lambda *a: jnp.sum((f(*a) * cot).astype(jnp.float32))
  ours = jax.grad(loss(lambda *a: grouped_swiglu(*a, L, INTERPRET)), (0, 1, 2))(x, wg, wu)
  refs = jax.grad(loss(ref), (0, 1, 2))(x, wg, wu)
  for a, b in zip(ours, refs):
    np.testing.assert_allclose(f32(a), f32(b), **tol)
  assert not np.any(f32(ours[1][1])) and not np.any(f32(ours[2][1]))  # empty expert: zero grad


@pytest.mark.parametrize("dispatch", ["pallas", "tiled"])
def test_layer_with_fused_router_equals_unfused_sorted_layer(dispatch):
  from moe_jax import MoEConfig, MoELayer
  x = jax.random.normal(jax.random.key(0), (2, 12, 16))
  base = dict(num_experts=4, expert_hidden_dim=24, load_balance_weight=0.1)
  ref_layer = MoELayer(MoEConfig(dispatch="sorted", **base))
  fused_layer = MoELayer(MoEConfig(dispatch=dispatch, router=dict(name="top_k", k=2, fused=True),
                                     **base))
  params = ref_layer.init(jax.random.key(1), x)["params"]

  def loss(layer):
    def f(params, x):
      y, state = layer.apply({"params": params}, x, mutable=["aux_loss"])
      return jnp.sum(y ** 2) + sum(jax.tree.leaves(state["aux_loss"]))
    return jax.value_and_grad(f, (0, 1))

  (l_ref, g_ref), (l_ours, g_ours) = loss(ref_layer)(params, x), loss(fused_layer)(params, x)
  np.testing.assert_allclose(l_ours, l_ref, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_fused_router_is_a_top_k_option():
  from moe_jax import MoEConfig
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['fused'\] for router "
                                       r"'expert_choice'; valid: jitter"):
    MoEConfig(router=dict(name="expert_choice", fused=True))


def test_every_kernel_lowers_for_triton_and_mosaic(capsys):
  """Pallas -> Triton / Mosaic lowering runs on CPU via jax.export: catches what they reject."""
  from kernels_pallas import check_lowering
  assert check_lowering.main() == 0, capsys.readouterr().out


@settings(max_examples=4, deadline=None)
@given(layouts())
def test_tile_loop_matmul_and_ffn_match_reference_with_gradients(case):
  """The CPU while-loop path: matmul and the fused SwiGLU FFN, outputs and all gradients,
  f32 and bf16."""
  from kernels_pallas.tile_loop import tile_loop_matmul, tile_loop_swiglu_ffn
  E, X, bm, expert, valid, seed = case
  L = _layout(expert, valid, E, bm)
  ks = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(ks[0], (L.num_rows, 16))
  wg, wu = (jax.random.normal(k, (E, 16, 12)) / 4 for k in ks[1:3])
  wd = jax.random.normal(ks[3], (E, 12, 16)) / 4
  cot = jax.random.normal(ks[4], (L.num_rows, 16))
  tol = dict(rtol=1e-4, atol=1e-5)
  ref_mm = lambda a, w: gmm_reference(a, w, L.tile_expert_I, bm)
  np.testing.assert_allclose(tile_loop_matmul(x, wg, L), ref_mm(x, wg), **tol)
  cot12 = cot[:, :12]
  ours = jax.grad(lambda a, w: jnp.sum(tile_loop_matmul(a, w, L) * cot12), (0, 1))(x, wg)
  refs = jax.grad(lambda a, w: jnp.sum(ref_mm(a, w) * cot12), (0, 1))(x, wg)
  for a, b in zip(ours, refs):
    np.testing.assert_allclose(a, b, **tol)
  ref_ffn = lambda x, wg, wu, wd: ref_mm(jax.nn.silu(ref_mm(x, wg)) * ref_mm(x, wu), wd)
  np.testing.assert_allclose(tile_loop_swiglu_ffn(x, wg, wu, wd, L), ref_ffn(x, wg, wu, wd), **tol)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * cot)
  ours = jax.grad(loss(lambda *a: tile_loop_swiglu_ffn(*a, L)), (0, 1, 2, 3))(x, wg, wu, wd)
  refs = jax.grad(loss(ref_ffn), (0, 1, 2, 3))(x, wg, wu, wd)
  for a, b in zip(ours, refs):
    np.testing.assert_allclose(a, b, **tol)
  # bf16 operands move through the loops as uint16 bits: same values, bf16 rounding only.
  bf = lambda *a: [v.astype(jnp.bfloat16) for v in a]
  close = lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), b, rtol=0, atol=0.02 * float(jnp.max(jnp.abs(b))) + 1e-6)
  args16 = bf(x, wg, wu, wd)
  ref32 = [v.astype(jnp.float32) for v in args16]  # the reference sees the same rounded inputs
  close(tile_loop_matmul(args16[0], args16[1], L), ref_mm(*ref32[:2]))
  close(tile_loop_swiglu_ffn(*args16, L), ref_ffn(*ref32))
  ours = jax.grad(loss(lambda *a: tile_loop_swiglu_ffn(*a, L).astype(jnp.float32)),
                  (0, 1, 2, 3))(*args16)
  refs = jax.grad(loss(ref_ffn), (0, 1, 2, 3))(*ref32)
  for a, b in zip(ours, refs):
    assert a.dtype == jnp.bfloat16
    close(a, b)


@settings(max_examples=4, deadline=None)
@given(layouts())
def test_tpu_grouped_matmul_matches_reference_with_gradients(case):
  """The Mosaic (TPU) formulation, in interpret mode: outputs, d lhs, d rhs; empty experts
  (never visited by tgmm) keep exactly zero gradient through the aliased zeros."""
  from kernels_pallas.gmm_tpu import grouped_matmul_tpu
  E, X, bm, expert, valid, seed = case
  L = _layout(expert, valid, E, bm)
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(k1, (L.num_rows, 16))
  rhs = jax.random.normal(k2, (E, 16, 24))
  cot = jax.random.normal(k3, (L.num_rows, 24))
  ref = lambda a, b: gmm_reference(a, b, L.tile_expert_I, bm)
  np.testing.assert_allclose(grouped_matmul_tpu(lhs, rhs, L), ref(lhs, rhs), rtol=1e-5, atol=1e-5)
  ours = jax.grad(lambda a, b: jnp.sum(grouped_matmul_tpu(a, b, L) * cot), (0, 1))(lhs, rhs)
  refs = jax.grad(lambda a, b: jnp.sum(ref(a, b) * cot), (0, 1))(lhs, rhs)
  for a, b in zip(ours, refs):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for e in set(range(E)) - set(expert[valid].tolist()):
    assert not np.any(ours[1][e])


def test_tpu_tile_ops_dispatch_equals_sorted():
  from moe_jax import get_dispatcher
  from moe_jax.nn.dispatch import pallas_tile_ops
  from moe_jax.nn.dispatch.tiles import tile_padded_ffn
  from tests.nn.test_dispatch import random_decision, random_experts
  experts = random_experts(jax.random.key(0))
  decision = random_decision(jax.random.key(1), masked=True)
  x = jax.random.normal(jax.random.key(2), (decision.num_tokens, experts.d_model))
  f = lambda name: lambda x, ex: jnp.sum(
      (tile_padded_ffn(x, decision, ex, pallas_tile_ops("tpu"), 8) if name == "tpu"
       else get_dispatcher("sorted")(x, decision, ex))[0] ** 2)
  (l_tpu, g_tpu), (l_ref, g_ref) = (jax.value_and_grad(f(n), (0, 1))(x, experts)
                                    for n in ("tpu", "sorted"))
  np.testing.assert_allclose(l_tpu, l_ref, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_tpu), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
