r"""Benchmark of the MoE FFN layer against a dense FFN of the same active FLOPs.

Shapes, targets, peers and measured tables: docs/performance.md. Every (shape, variant, mode) runs in
this one process on random bf16 data: jit, compile (timed separately), one
warm-up call, then the median of --iters calls (at least 3; fewer than --iters once
the timed calls of a row add up to --max_row_s). Variants:
  dense_equiv  one dense SwiGLU FFN over T*K tokens (same active FLOPs, no routing)
  einsum       top-k router (float32) + moe_jax einsum dispatch, groups 1024, cf 1.25
  sorted       top-k router + moe_jax sorted dispatch (dropless, jax.lax.ragged_dot)
  pallas       top-k router + moe_jax pallas dispatch (dropless, kernels_pallas grouped
               matmul over a tile-padded layout; interpret mode on CPU, so slow there)
  pallas_fused as pallas, with the fused router kernel (its in-group positions build
               the tile layout without a sort)
  tiled        top-k router + moe_jax tiled dispatch (dropless, same layout in plain XLA:
               on CPU one while loop over the used tiles, elsewhere per-tile gathered
               weights + one batched matmul)
  tokamax      as sorted, with tokamax.ragged_dot for the grouped matmuls (only
               when `import tokamax` works)
  megablox     as sorted, with the megablox Pallas gmm of jax.experimental (TPU only)
  ep           expert parallel over all devices (--suite=ep), capacity mode, cf 1.25,
               einsum local experts
  ep_dropless  expert parallel, dropless mode (ragged_all_to_all on GPU/TPU, padded
               all_to_all emulation on CPU), `auto` dispatcher local experts
On CPU a bare run leaves out pallas and pallas_fused (interpret mode: correct, ~100 s,
no speed to read); name them in --variants to run them. Modes: fwd (the forward) and fwd_bwd (value_and_grad of sum(y**2) w.r.t. x, the
router weight and every expert weight). ratio_to_dense = dense_equiv ms / variant ms.

Commands (from the repository root):
  python -m experiments.bench --suite=layer --shapes=cpu --json=bench_out/layer_cpu.json
  python -m experiments.bench --suite=layer --shapes=gpu --json=bench_out/layer_gpu.json
  python -m experiments.bench --suite=scaling --shapes=cpu
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.bench --suite=ep
  python -m experiments.bench --suite=layer --shapes=gpu --modes=fwd_bwd \
      --variants=dense_equiv,sorted --iters=5
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

from absl import app, flags
import flax
import jax
import jax.numpy as jnp

from experiments import cli
from moe_jax.nn.dispatch import CapacityOptions, get_dispatcher
from moe_jax.parallel.expert_parallel import expert_parallel_ffn
from moe_jax.parallel.ragged_exchange import ragged_supported
from moe_jax.nn.experts import ExpertWeights
from moe_jax.nn.routing import RoutingDecision, TopKRouter, token_choice_capacity
from moe_jax.parallel.sharding import make_mesh

try:  # Optional grouped-matmul kernels; absent on CPU and on many GPU machines.
  import tokamax
  TOKAMAX_ERROR = None
except Exception as e:  # pylint: disable=broad-except
  tokamax, TOKAMAX_ERROR = None, f"{type(e).__name__}: {e}"

MODES = ("fwd", "fwd_bwd")
VARIANTS = ("dense_equiv", "einsum", "sorted", "tiled", "pallas", "pallas_fused", "ep",
            "ep_dropless", "tokamax", "megablox")
EINSUM_GROUP_SIZE = 1024
EINSUM_CAPACITY_FACTOR = 1.25

_SUITE = flags.DEFINE_string("suite", "layer", "Benchmark suite: layer, scaling or ep.")
_SHAPES = flags.DEFINE_enum("shapes", "cpu", ["cpu", "gpu"], "Shape set.")
_JSON = flags.DEFINE_string("json", None, "Write {meta, rows} to this path.")
_MODES = flags.DEFINE_list("modes", list(MODES), f"Subset of {MODES}.")
# Pallas runs its kernels in interpret mode on CPU: a correctness path, minutes to time.
INTERPRET_ON_CPU = ("pallas", "pallas_fused")
_VARIANTS = flags.DEFINE_list("variants", None, f"Subset of {VARIANTS} (default: all; on CPU "
                              f"all but the interpret-mode {','.join(INTERPRET_ON_CPU)}).")
_ITERS = flags.DEFINE_integer("iters", None, "Timed calls per row (default 15 gpu, 5 cpu).")
_MAX_ROW_S = flags.DEFINE_float(
    "max_row_s", 10.0, "Stop a row's timed calls once they took this long (at least 3 calls).")


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  T: int  # tokens
  D: int  # model dim
  F: int  # expert hidden dim
  E: int  # experts
  K: int  # experts per token

  def active_flops(self, mode: str) -> float:
    fwd = 2.0 * self.T * self.K * 3 * self.D * self.F  # SwiGLU: gate, up, down
    return fwd if mode == "fwd" else 3.0 * fwd


SHAPES = {
    "gpu": [Shape("mixtral", 16384, 4096, 14336, 8, 2),
            Shape("olmoe", 16384, 2048, 1024, 64, 8),
            Shape("qwen3", 16384, 2048, 768, 128, 8)],
    # Scaled down for 2 CPU cores; cpu_olmoe (E=64, K=8) carries the CPU target.
    # jax.lax.ragged_dot on CPU costs about E x the active FLOPs, so `sorted` dominates.
    "cpu": [Shape("cpu_mixtral", 1024, 256, 896, 8, 2),
            Shape("cpu_olmoe", 1024, 256, 128, 64, 8),
            Shape("cpu_qwen3", 1024, 256, 96, 128, 8)],
}


@dataclasses.dataclass(frozen=True)
class Options:
  """What a suite runs, from the flags."""

  shapes: str
  modes: list[str]
  variants: list[str]
  iters: int
  max_row_s: float


# ----------------------------------------------------------------------------- variants


def normal(key, shape, fan_in: int, dtype=jnp.bfloat16) -> jax.Array:
  """Random N(0, 1/fan_in) values: never zeros, outputs stay O(1)."""
  return (jax.random.normal(key, shape, jnp.float32) * fan_in ** -0.5).astype(dtype)


def dense_inputs(s: Shape, key) -> tuple:
  kx, ku, kg, kd = jax.random.split(key, 4)
  weights = {"up_DF": normal(ku, (s.D, s.F), s.D), "gate_DF": normal(kg, (s.D, s.F), s.D),
             "down_FD": normal(kd, (s.F, s.D), s.F)}
  return normal(kx, (s.T * s.K, s.D), 1), weights


def moe_inputs(s: Shape, key) -> tuple:
  kx, kr, ku, kg, kd = jax.random.split(key, 5)
  experts = ExpertWeights(w_up_EDF=normal(ku, (s.E, s.D, s.F), s.D),
                          w_down_EFD=normal(kd, (s.E, s.F, s.D), s.F),
                          w_gate_EDF=normal(kg, (s.E, s.D, s.F), s.D), activation="swiglu")
  return normal(kx, (s.T, s.D), 1), normal(kr, (s.D, s.E), s.D, jnp.float32), experts


def dense_equiv(s: Shape, x_XD, w) -> jax.Array:
  del s
  h_XF = jax.nn.silu(x_XD @ w["gate_DF"]) * (x_XD @ w["up_DF"])
  return h_XF @ w["down_FD"]


def route_top_k(x_TD, w_DE, k: int, fused: bool = False) -> RoutingDecision:
  """The library's TopKRouter (float32 logits, renormalised top-k, aux losses)."""
  return TopKRouter(num_experts=w_DE.shape[1], k=k, fused=fused).apply(
      {"params": {"w_DE": w_DE}}, x_TD)


def moe_einsum(s: Shape, x_TD, w_DE, experts) -> jax.Array:
  opts = CapacityOptions(capacity_factor=EINSUM_CAPACITY_FACTOR,
                         group_size=min(EINSUM_GROUP_SIZE, s.T))
  y_TD, _ = get_dispatcher("einsum")(x_TD, route_top_k(x_TD, w_DE, s.K), experts, opts)
  return y_TD



def moe_dispatch(name: str, s: Shape, x_TD, w_DE, experts, fused: bool = False) -> jax.Array:
  y_TD, _ = get_dispatcher(name)(x_TD, route_top_k(x_TD, w_DE, s.K, fused), experts)
  return y_TD


def ep_mesh(num_experts: int):
  """All devices: the expert axis takes the largest device-count divisor of E, data the rest."""
  n = jax.device_count()
  expert = max(d for d in range(1, n + 1) if n % d == 0 and num_experts % d == 0)
  return make_mesh({"data": n // expert, "expert": expert})


def moe_ep(s: Shape, x_TD, w_DE, experts) -> jax.Array:
  """Expert parallel (shard_map + all_to_all), capacity factor 1.25, groups = device shards."""
  y_TD, _ = expert_parallel_ffn(x_TD, route_top_k(x_TD, w_DE, s.K), experts, ep_mesh(s.E),
                                capacity_factor=EINSUM_CAPACITY_FACTOR)
  return y_TD


def moe_ep_dropless(s: Shape, x_TD, w_DE, experts) -> jax.Array:
  """Expert parallel, dropless: ragged exchange (emulated with a padded all_to_all on CPU)."""
  y_TD, _ = expert_parallel_ffn(x_TD, route_top_k(x_TD, w_DE, s.K), experts, ep_mesh(s.E),
                                mode="dropless", local_dispatch="auto")
  return y_TD


@flax.struct.dataclass
class TokamaxExpertWeights(ExpertWeights):
  """ExpertWeights whose ragged (sorted-dispatch) path uses tokamax.ragged_dot."""

  def ragged(self, x_XD, group_sizes_E):
    up = tokamax.ragged_dot(x_XD, self.w_up_EDF, group_sizes_E)
    gate = tokamax.ragged_dot(x_XD, self.w_gate_EDF, group_sizes_E)
    h = (jax.nn.silu(gate) * up).astype(self.w_down_EFD.dtype)
    return tokamax.ragged_dot(h, self.w_down_EFD, group_sizes_E)


@flax.struct.dataclass
class MegabloxExpertWeights(ExpertWeights):
  """ExpertWeights whose ragged path uses the megablox gmm (Pallas Mosaic, TPU only)."""

  def ragged(self, x_XD, group_sizes_E):
    from jax.experimental.pallas.ops.tpu.megablox import gmm  # pylint: disable=import-outside-toplevel
    gate = gmm(x_XD, self.w_gate_EDF, group_sizes_E)
    up = gmm(x_XD, self.w_up_EDF, group_sizes_E)
    h = (jax.nn.silu(gate) * up).astype(self.w_down_EFD.dtype)
    return gmm(h, self.w_down_EFD, group_sizes_E)


def with_ragged(cls, experts: ExpertWeights) -> ExpertWeights:
  return cls(**{f.name: getattr(experts, f.name) for f in dataclasses.fields(experts)})


def moe_tokamax(s: Shape, x_TD, w_DE, experts) -> jax.Array:
  return moe_dispatch("sorted", s, x_TD, w_DE, with_ragged(TokamaxExpertWeights, experts))


def moe_megablox(s: Shape, x_TD, w_DE, experts) -> jax.Array:
  return moe_dispatch("sorted", s, x_TD, w_DE, with_ragged(MegabloxExpertWeights, experts))


@dataclasses.dataclass(frozen=True)
class Variant:
  make_inputs: Callable[[Shape, jax.Array], tuple]
  apply: Callable[..., jax.Array]  # (shape, *inputs) -> y


VARIANT_FNS = {
    "dense_equiv": Variant(dense_inputs, dense_equiv),
    "einsum": Variant(moe_inputs, moe_einsum),
    "sorted": Variant(moe_inputs, functools.partial(moe_dispatch, "sorted")),
    "pallas": Variant(moe_inputs, functools.partial(moe_dispatch, "pallas")),
    "tiled": Variant(moe_inputs, functools.partial(moe_dispatch, "tiled")),
    "ep": Variant(moe_inputs, moe_ep),
    "ep_dropless": Variant(moe_inputs, moe_ep_dropless),
    "pallas_fused": Variant(moe_inputs, functools.partial(moe_dispatch, "pallas", fused=True)),
    "tokamax": Variant(moe_inputs, moe_tokamax),
    "megablox": Variant(moe_inputs, moe_megablox),
}


# ----------------------------------------------------------------------------- timing


def make_step(apply: Callable[..., jax.Array], mode: str, num_inputs: int) -> Callable:
  """The function timed for a mode: the forward, or loss and grads w.r.t. every input."""
  if mode == "fwd":
    return apply
  loss = lambda *inputs: jnp.sum(jnp.square(apply(*inputs).astype(jnp.float32)))
  return jax.value_and_grad(loss, argnums=tuple(range(num_inputs)))


def describe(e: Exception) -> str:
  """One line for the table: exception type and the first line of its message."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def all_finite(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


def time_step(step: Callable, inputs: tuple, iters: int, max_s: float) -> dict:
  """Compile (timed), warm up once, then the median wall time of `iters` calls.

  Slow rows stop early: after 3 calls, once the timed calls add up to `max_s`.
  """
  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(*inputs).compile()
  compile_s = time.perf_counter() - t0
  out = jax.block_until_ready(compiled(*inputs))
  times = []
  while len(times) < iters and (len(times) < 3 or sum(times) < max_s):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*inputs))
    times.append(time.perf_counter() - t0)
  return {"ms": 1e3 * statistics.median(times), "iters": len(times), "compile_s": compile_s,
          "finite": all_finite(out)}


def empty_row(s: Shape, variant: str, mode: str, error: str | None = None) -> dict:
  return {"shape": s.name, "variant": variant, "mode": mode, "ms": None, "active_tflops": None,
          "ratio_to_dense": None, "compile_s": None, "iters": 0, "finite": None, "error": error}


def bench_row(s: Shape, variant: str, mode: str, inputs: tuple, opts: Options) -> dict:
  row = empty_row(s, variant, mode)
  try:
    step = make_step(functools.partial(VARIANT_FNS[variant].apply, s), mode, len(inputs))
    row.update(time_step(step, inputs, opts.iters, opts.max_row_s))
    row["active_tflops"] = s.active_flops(mode) / (row["ms"] * 1e-3) / 1e12
    if not row["finite"]:
      print(f"WARNING: non-finite values in {s.name}/{variant}/{mode} output", flush=True)
  except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory)
    row["error"] = describe(e)
  return row


def add_ratios(rows: list[dict]) -> None:
  """ratio_to_dense = dense_equiv ms / variant ms for the same shape and mode."""
  dense_ms = {(r["shape"], r["mode"]): r["ms"] for r in rows if r["variant"] == "dense_equiv"}
  for r in rows:
    ref = dense_ms.get((r["shape"], r["mode"]))
    if ref and r["ms"]:
      r["ratio_to_dense"] = ref / r["ms"]


# ----------------------------------------------------------------------------- suites


def scaling_shapes(kind: str) -> list[Shape]:
  """E from 8 to 256 at fixed T, D, F, K: the same active FLOPs at every E."""
  T, D, F, K = (16384, 2048, 1024, 8) if kind == "gpu" else (1024, 256, 128, 8)
  return [Shape(f"E{E}", T, D, F, E, K) for E in (8, 16, 32, 64, 128, 256)]


def run_scaling_suite(opts: Options) -> list[dict]:
  """Time per token as E grows at fixed K and active FLOPs (target: flat within 15%)."""
  rows = run_layer_suite(opts, scaling_shapes(opts.shapes))
  for r in rows:
    shape = next(s for s in scaling_shapes(opts.shapes) if s.name == r["shape"])
    r["us_per_token"] = None if r["ms"] is None else 1e3 * r["ms"] / shape.T
  print("\ntime per token (us) by E; spread = max / min over E")
  for variant in dict.fromkeys(r["variant"] for r in rows):
    for mode in opts.modes:
      us = [r["us_per_token"] for r in rows if r["variant"] == variant and r["mode"] == mode]
      ok = [u for u in us if u]
      spread = f"{max(ok) / min(ok):.2f}x" if len(ok) > 1 else "-"
      print(f"  {variant:<12} {mode:<8} " + " ".join(fmt(u, 8, 2) for u in us) + f"  spread {spread}")
  return rows


def run_layer_suite(opts: Options, shapes: list[Shape] | None = None) -> list[dict]:
  """Every shape x variant x mode of one MoE FFN layer; errors become rows."""
  variants = [v for v in opts.variants if v != "tokamax" or tokamax is not None]
  if "tokamax" in opts.variants and tokamax is None:
    print(f"tokamax variant skipped: import tokamax failed ({TOKAMAX_ERROR})", flush=True)
  if "megablox" in variants and jax.default_backend() != "tpu":
    variants.remove("megablox")
    print("megablox variant skipped: its Mosaic kernel needs a TPU", flush=True)
  rows = []
  for s in shapes or SHAPES[opts.shapes]:
    for variant in variants:
      try:
        inputs = jax.block_until_ready(VARIANT_FNS[variant].make_inputs(s, jax.random.key(0)))
      except Exception as e:  # pylint: disable=broad-except
        rows += [empty_row(s, variant, m, "inputs: " + describe(e)) for m in opts.modes]
        continue
      for mode in opts.modes:
        rows.append(bench_row(s, variant, mode, inputs, opts))
        print("  " + format_row(rows[-1]), flush=True)
      del inputs
  add_ratios(rows)
  return rows


def ep_shapes(kind: str) -> list[Shape]:
  return [Shape("ep_gpu", 16384, 2048, 1024, 64, 8)] if kind == "gpu" else [
      Shape("ep_cpu", 2048, 256, 256, 8, 2)]


def ep_bytes(s: Shape, mesh) -> dict[str, float]:
  """MB one forward pass moves between devices (both exchanges, there and back).

  capacity: each device sends the (N-1)/N of its [E, C, D] buffer held elsewhere.
  dropless_emulated: the CPU fallback sends N blocks of M = T/n * min(K, L) rows.
  dropless_ragged: what ragged_all_to_all moves, counted on this benchmark's routing
  (slots whose expert sits on another device of the token's expert-axis group).
  The backward pass moves the same again. bf16 rows of D values.
  """
  n, N = jax.device_count(), mesh.shape["expert"]
  t, L, row = s.T // n, s.E // N, s.D * 2
  C = token_choice_capacity(t, s.K, s.E, EINSUM_CAPACITY_FACTOR)
  x_TD, w_DE, _ = moe_inputs(s, jax.random.key(0))  # the inputs the rows are timed on
  index_TK = route_top_k(x_TD, w_DE, s.K).expert_index_TK
  shard_T = jnp.arange(s.T) // t % N  # expert-axis position of each token's device
  off_device = int(jnp.sum(index_TK // L != shard_T[:, None]))
  return {"capacity": 2 * n * s.E * C * row * (N - 1) / N / 1e6,
          "dropless_emulated": 2 * n * N * t * min(s.K, L) * row * (N - 1) / N / 1e6,
          "dropless_ragged": 2 * off_device * row / 1e6, "C": C}


def run_ep_suite(opts: Options) -> list[dict]:
  """Expert-parallel layer (capacity, dropless) vs single-device einsum and tiled, with
  the bytes exchanged per MoE layer.

  On one host simulate devices: XLA_FLAGS=--xla_force_host_platform_device_count=8.
  """
  opts = dataclasses.replace(opts, variants=["einsum", "tiled", "ep", "ep_dropless"])
  rows = run_layer_suite(opts, ep_shapes(opts.shapes))
  for s in ep_shapes(opts.shapes):
    mesh = ep_mesh(s.E)
    mb = ep_bytes(s, mesh)
    print(f"{s.name}: mesh {dict(mesh.shape)}, C={mb['C']} per expert and device; MB exchanged "
          f"per layer forward (x2 with backward): capacity {mb['capacity']:.1f}, dropless "
          f"{mb['dropless_emulated']:.1f} as emulated on CPU, {mb['dropless_ragged']:.1f} "
          "with ragged_all_to_all")
    key = {"ep": "capacity", "ep_dropless": ("dropless_ragged" if ragged_supported()
                                             else "dropless_emulated")}
    for r in rows:
      if r["shape"] == s.name and r["variant"] in key:
        r["all_to_all_mb"] = (1 if r["mode"] == "fwd" else 2) * mb[key[r["variant"]]]
  return rows


SUITES: dict[str, Callable[[Options], list[dict]]] = {"layer": run_layer_suite,
                                                     "scaling": run_scaling_suite,
                                                     "ep": run_ep_suite}


# ----------------------------------------------------------------------------- report


def meta_info(opts: Options, suite: str) -> dict:
  dev = jax.devices()[0]
  try:
    jaxlib_version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    jaxlib_version = None
  return {"suite": suite, "shapes": opts.shapes, "modes": opts.modes, "variants": opts.variants,
          "iters": opts.iters, "max_row_s": opts.max_row_s, "backend": jax.default_backend(),
          "device_kind": dev.device_kind,
          "device_count": jax.device_count(), "jax": jax.__version__, "jaxlib": jaxlib_version,
          "tokamax": getattr(tokamax, "__version__", "?") if tokamax else None,
          "tokamax_error": TOKAMAX_ERROR, "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def fmt(value, width: int, digits: int) -> str:
  return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def format_row(r: dict) -> str:
  return (f"{r['shape']:<12} {r['variant']:<12} {r['mode']:<8} {fmt(r['ms'], 10, 2)} "
          f"{fmt(r['active_tflops'], 9, 3)} {fmt(r['ratio_to_dense'], 7, 3)} "
          f"{fmt(r['compile_s'], 9, 2)} {r['iters']:>5}  "
          f"{r['error'] or ('' if r['finite'] else 'NON-FINITE')}")


def print_table(rows: list[dict]) -> None:
  print(f"{'shape':<12} {'variant':<12} {'mode':<8} {'ms':>10} {'TFLOP/s':>9} "
        f"{'ratio':>7} {'compile_s':>9} {'iters':>5}  error")
  for r in rows:
    print(format_row(r))


def default_variants(backend: str) -> list[str]:
  """Every variant, less the interpret-mode Pallas ones on CPU."""
  return [v for v in VARIANTS if backend != "cpu" or v not in INTERPRET_ON_CPU]


def parse_list(flag_name: str, values: list[str], allowed: tuple[str, ...]) -> list[str]:
  unknown = [v for v in values if v not in allowed]
  if unknown or not values:
    sys.exit(f"error: --{flag_name}={','.join(values)} has unknown or no values; "
             f"allowed: {','.join(allowed)}")
  return list(values)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if _SUITE.value not in SUITES:
    sys.exit(f"error: unknown --suite={_SUITE.value}; allowed: {','.join(SUITES)}")
  opts = Options(shapes=_SHAPES.value, modes=parse_list("modes", _MODES.value, MODES),
                 variants=(default_variants(jax.default_backend()) if _VARIANTS.value is None
                           else parse_list("variants", _VARIANTS.value, VARIANTS)),
                 iters=_ITERS.value or (15 if _SHAPES.value == "gpu" else 5),
                 max_row_s=_MAX_ROW_S.value)
  if _VARIANTS.value is None and jax.default_backend() == "cpu":
    print(f"left out on CPU: {','.join(INTERPRET_ON_CPU)} (interpret mode, ~100 s); "
          "name them in --variants to run them")
  meta = meta_info(opts, _SUITE.value)
  print(f"jax {meta['jax']} (jaxlib {meta['jaxlib']}), backend {meta['backend']}, "
        f"{meta['device_count']} x {meta['device_kind']}, iters {opts.iters}")
  shapes = {"scaling": scaling_shapes, "ep": ep_shapes}.get(_SUITE.value, SHAPES.get)(opts.shapes)
  for s in shapes:
    print(f"shape {s.name}: T={s.T} D={s.D} F={s.F} E={s.E} K={s.K}, "
          f"active GFLOP fwd={s.active_flops('fwd') / 1e9:.2f}")
  t0 = time.perf_counter()
  rows = SUITES[_SUITE.value](opts)
  meta["wall_s"] = time.perf_counter() - t0
  print(f"\nratio = dense_equiv ms / variant ms (share of the dense ceiling); "
        f"TFLOP/s = active FLOPs / time; wall {meta['wall_s']:.1f} s")
  print_table(rows)
  if _JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
    with open(_JSON.value, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  cli.run(main)
