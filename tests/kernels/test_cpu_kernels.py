"""kernels_cpu (native grouped matmuls through the XLA FFI) against the plain-JAX loops over
experts, forward and backward, f32 and bf16; and the `tiled` dispatcher really uses them."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.reference import gmm_reference, tgmm_reference
from tests.kernels.test_kernels import _layout, layouts

if os.environ.get("MOE_JAX_CPU_KERNELS") == "0":
  pytest.skip("native CPU kernels turned off (MOE_JAX_CPU_KERNELS=0)", allow_module_level=True)

from kernels_cpu import build  # noqa: E402
from kernels_cpu.tile_matmul import gmm, tgmm, tile_matmul, tile_swiglu_ffn  # noqa: E402

f32 = lambda a: np.asarray(a, np.float32)


def test_kernels_build_and_register():
  assert build.unavailable() is None  # a failed build is a failure here, not a skip


@settings(max_examples=6, deadline=None)
@given(layouts(), st.sampled_from([jnp.float32, jnp.bfloat16]), st.sampled_from([72, 100]))
def test_gmm_and_tgmm_match_the_loop_over_experts(case, dtype, N):
  E, X, bm, expert, valid, seed = case
  L = _layout(expert, valid, E, bm)
  K = 20  # not a multiple of the 6-row block; N = one 64-column block + a tail of 8 or 36
  ks = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(ks[0], (L.num_rows, K)).astype(dtype)
  rhs = jax.random.normal(ks[1], (E, K, N)).astype(dtype)
  grad = jax.random.normal(ks[2], (L.num_rows, N)).astype(dtype)
  tol = dict(rtol=1e-2, atol=1e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
  out = gmm(lhs, rhs, L)
  assert out.dtype == dtype
  np.testing.assert_allclose(f32(out), f32(gmm_reference(lhs, rhs, L.tile_expert_I, bm)), **tol)
  used = int(L.tile_end_E[-1]) * bm
  assert not np.any(f32(out)[used:])  # rows past the last expert: exactly zero
  np.testing.assert_allclose(
      f32(gmm(grad, rhs, L, transpose_rhs=True)),  # d lhs = grad @ rhs[e]^T
      f32(gmm_reference(grad, rhs, L.tile_expert_I, bm, transpose_rhs=True)), **tol)
  d_rhs = tgmm(lhs, grad, L, E, out_dtype=jnp.float32)
  np.testing.assert_allclose(d_rhs, tgmm_reference(lhs.astype(jnp.float32), grad.astype(
      jnp.float32), L.tile_expert_I, E, bm), **tol)
  empty = np.asarray(L.tile_end_E) == np.asarray(L.tile_start_E)
  assert not np.any(f32(d_rhs)[empty])  # experts without rows: exactly zero


def test_bf16_outputs_are_rounded_to_nearest_and_nan_propagates():
  """Each bf16 output is the f32 sum rounded to nearest even (truncating would be off by one
  ulp on about half of them); a NaN input row gives a NaN output row."""
  E, bm = 2, 8
  L = _layout(np.arange(40) % E, np.ones(40, bool), E, bm)
  ks = jax.random.split(jax.random.key(3), 2)
  lhs = jax.random.normal(ks[0], (L.num_rows, 32)).astype(jnp.bfloat16)
  rhs = jax.random.normal(ks[1], (E, 32, 100)).astype(jnp.bfloat16)
  exact = gmm_reference(lhs.astype(jnp.float32), rhs.astype(jnp.float32), L.tile_expert_I, bm)
  ours = gmm(lhs, rhs, L)
  ulps = np.abs(np.asarray(ours).view(np.int16).astype(np.int32)
                - np.asarray(exact.astype(jnp.bfloat16)).view(np.int16).astype(np.int32))
  assert ulps.max() <= 1 and np.mean(ulps == 0) > 0.97  # f32 sums in another order may tie
  row = int(L.slot_row_X[5])
  nan_out = f32(gmm(lhs.at[row].set(jnp.nan), rhs, L))
  assert np.all(np.isnan(nan_out[row])) and not np.any(np.isnan(np.delete(nan_out, row, 0)))


def test_a_layout_whose_tile_ranges_do_not_run_back_to_back_is_refused():
  """Ranges with a gap or past the rows would leave rows unwritten or reach past the
  buffers; the kernels check them before any work."""
  L = _layout(np.arange(12) % 3, np.ones(12, bool), 3, 4)
  lhs, rhs = jnp.ones((L.num_rows, 8)), jnp.ones((3, 8, 8))
  gap = L.replace(tile_start_E=L.tile_start_E.at[2].add(1), tile_end_E=L.tile_end_E.at[2].add(1))
  past = L.replace(tile_end_E=L.tile_end_E.at[2].set(L.num_rows // 4 + 1))
  for bad in (gap, past):
    with pytest.raises(Exception, match="back to back"):
      jax.block_until_ready(gmm(lhs, rhs, bad))
  with pytest.raises(Exception, match="back to back"):
    jax.block_until_ready(tgmm(lhs, lhs, gap, 3))


def test_a_failed_build_says_why_and_tiled_falls_back_to_the_tile_loop(tmp_path, monkeypatch):
  bad_cxx = tmp_path / "cxx"
  bad_cxx.write_text("#!/bin/sh\necho 'x.cc:1: error: no vectors here' >&2\nexit 1\n")
  bad_cxx.chmod(0o755)
  monkeypatch.setenv("CXX", f"{bad_cxx} -DUNUSED")  # a command with arguments is split
  monkeypatch.setenv("MOE_JAX_CACHE", str(tmp_path / "cache"))
  with pytest.raises(RuntimeError, match=r"\[-march=native\] x.cc:1: error: no vectors here; "
                     r"\[portable\]"):
    build.library_path()
  assert not list((tmp_path / "cache").rglob("*.tmp"))  # no half-built file left behind
  monkeypatch.setenv("CXX", str(tmp_path / "missing-c++"))
  with pytest.raises(RuntimeError, match="no C.. compiler"):
    build.library_path()
  from moe_jax.nn.dispatch import tiled
  monkeypatch.setattr(build, "unavailable", lambda: "RuntimeError: test")
  assert not tiled.native_cpu_kernels(jnp.ones(3))


def test_matmul_and_swiglu_ffn_gradients_match_autodiff_of_the_reference():
  E, bm = 4, 8
  expert = np.random.default_rng(0).integers(0, E - 1, 37)  # the last expert stays empty
  L = _layout(expert, np.ones(37, bool), E, bm)
  ks = jax.random.split(jax.random.key(1), 5)
  x = jax.random.normal(ks[0], (L.num_rows, 16))
  wg, wu = (jax.random.normal(k, (E, 16, 24)) / 4 for k in ks[1:3])
  wd = jax.random.normal(ks[3], (E, 24, 16)) / 4
  cot = jax.random.normal(ks[4], (L.num_rows, 16))
  ref_mm = lambda a, w: gmm_reference(a, w, L.tile_expert_I, bm)
  ref_ffn = lambda x, wg, wu, wd: ref_mm(jax.nn.silu(ref_mm(x, wg)) * ref_mm(x, wu), wd)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * cot)
  tol = dict(rtol=1e-4, atol=1e-5)
  ours = jax.grad(loss(lambda a, w: tile_matmul(a, w, L)[:, :16]), (0, 1))(x, wg)
  refs = jax.grad(loss(lambda a, w: ref_mm(a, w)[:, :16]), (0, 1))(x, wg)
  for a, b in zip(ours, refs):
    np.testing.assert_allclose(a, b, **tol)
  np.testing.assert_allclose(tile_swiglu_ffn(x, wg, wu, wd, L), ref_ffn(x, wg, wu, wd), **tol)
  ours = jax.grad(loss(lambda *a: tile_swiglu_ffn(*a, L)), (0, 1, 2, 3))(x, wg, wu, wd)
  refs = jax.grad(loss(ref_ffn), (0, 1, 2, 3))(x, wg, wu, wd)
  for a, b in zip(ours, refs):
    np.testing.assert_allclose(a, b, **tol)
  assert not np.any(ours[1][E - 1])  # the empty expert's weight gradient is zero
  # bf16 operands (the two-product d x pass reads bf16 d gate / d up and weights)
  bf = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)
  ours = jax.grad(loss(lambda *a: tile_swiglu_ffn(*a, L).astype(jnp.float32)), (0, 1, 2, 3))(
      *bf((x, wg, wu, wd)))
  refs = jax.grad(loss(ref_ffn), (0, 1, 2, 3))(*jax.tree.map(f32, bf((x, wg, wu, wd))))
  for a, b in zip(ours, refs):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(f32(a), b, rtol=5e-2, atol=5e-2 * float(jnp.abs(b).max()))


def test_tiled_dispatch_runs_the_native_kernels_and_falls_back_in_shard_map():
  """The fast path is really taken on CPU (its custom call is in the compiled program);
  inside jax.shard_map the XLA tile loop runs instead, with the same result."""
  from jax.sharding import PartitionSpec as P

  from moe_jax.nn.dispatch import get_dispatcher
  from moe_jax.nn.experts import ExpertWeights
  from moe_jax.nn.routing import TopKRouter
  ks = jax.random.split(jax.random.key(2), 5)
  x = jax.random.normal(ks[0], (32, 16))
  experts = ExpertWeights(w_up_EDF=jax.random.normal(ks[1], (4, 16, 8)) / 4,
                          w_gate_EDF=jax.random.normal(ks[2], (4, 16, 8)) / 4,
                          w_down_EFD=jax.random.normal(ks[3], (4, 8, 16)) / 4,
                          activation="swiglu")
  router = TopKRouter(num_experts=4, k=2)
  params = router.init(ks[4], x)

  def layer(x):
    return get_dispatcher("tiled")(x, router.apply(params, x), experts)[0]

  hlo = jax.jit(layer).lower(x).compile().as_text()
  assert build.TARGETS["MoeGmm"] in hlo
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  sharded = jax.jit(jax.shard_map(layer, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  x_split = jax.device_put(x, jax.NamedSharding(mesh, P("data")))
  assert build.TARGETS["MoeGmm"] not in sharded.lower(x_split).compile().as_text()
  halves = jnp.concatenate([layer(x[:16]), layer(x[16:])])
  np.testing.assert_allclose(sharded(x_split), halves, rtol=1e-5, atol=1e-6)

  # Tokens replicated, expert weights varying over the axis (as under expert parallelism):
  # the fallback must see the weights too.
  def varying_weights(x, zero):
    w = experts.replace(w_up_EDF=experts.w_up_EDF + zero[0])
    return get_dispatcher("tiled")(x, router.apply(params, x), w)[0]

  vw = jax.jit(jax.shard_map(varying_weights, mesh=mesh, in_specs=(P(), P("data")),
                             out_specs=P("data")))
  zeros = jax.device_put(jnp.zeros(2), jax.NamedSharding(mesh, P("data")))
  assert build.TARGETS["MoeGmm"] not in vw.lower(x, zeros).compile().as_text()
  both = np.asarray(vw(x, zeros))  # each device's full result, stacked
  for half in (both[:32], both[32:]):
    np.testing.assert_allclose(half, layer(x), rtol=1e-5, atol=1e-6)


def _has_avx512() -> bool:
  try:
    return " avx512f" in open("/proc/cpuinfo").read()
  except OSError:
    return False


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="x86 register blocks")
def test_the_other_x86_register_blocks_match_the_reference():
  """The register blocks depend on the target (6 x 64 on AVX-512, 6 x 16 on AVX2), and the
  machine running the suite builds only its own: build the other one (AVX-512's 16-lane
  vectors emulated where the CPU lacks them) and run the fixed-shape tests on it."""
  import subprocess
  import sys
  flags = "-mno-avx512f" if _has_avx512() else "-D__AVX512F__"
  run = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__, "-k",
       "rounded or autodiff"],
      env={**os.environ, build.FLAGS_ENV: flags}, capture_output=True, text=True, timeout=600,
      check=False, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert run.returncode == 0 and "2 passed" in run.stdout, run.stdout[-3000:]
