"""experiments.bench as a program: its help, its default rows, one tiny run (no timing asserted)."""
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_help_exits_zero_and_names_the_performance_page():
  run = subprocess.run([sys.executable, "-m", "experiments.bench", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120, check=False)
  assert run.returncode == 0, run.stderr
  assert "docs/performance.md" in run.stdout and "--variants" in run.stdout
  assert (REPO / "docs" / "performance.md").is_file()


def test_bare_run_leaves_interpret_mode_pallas_out_on_cpu_only():
  from experiments import bench
  assert not {"pallas", "pallas_fused"} & set(bench.default_variants("cpu"))
  assert {"pallas", "pallas_fused", "tiled", "dense_equiv"} <= set(bench.default_variants("gpu"))


def test_layer_suite_rows_at_a_tiny_shape():
  from experiments import bench
  opts = bench.Options(shapes="cpu", modes=["fwd_bwd"], variants=["dense_equiv", "tiled"],
                       iters=3, max_row_s=5.0)
  rows = bench.run_layer_suite(opts, [bench.Shape("tiny", 64, 32, 16, 4, 2)])
  assert [(r["variant"], r["mode"]) for r in rows] == [("dense_equiv", "fwd_bwd"),
                                                       ("tiled", "fwd_bwd")]
  for r in rows:
    assert r["error"] is None and r["finite"] and r["iters"] >= 3
    assert r["ratio_to_dense"] > 0 and math.isfinite(r["active_tflops"])
  assert rows[0]["ratio_to_dense"] == 1.0


def test_lm_benchmark_counts_active_parameters_and_runs_a_tiny_model(tmp_path):
  """experiments.bench_lm: the active-parameter count by hand and from the parameter tree
  (all of it less the embedding, the norms and the E - K experts a token skips), then a
  few real steps of the library's train step with a JSON summary."""
  import json

  from experiments import bench_lm
  s = bench_lm.SIZES["tiny"]  # 2 layers, d 64, E 8, K 2, F 32, V 256
  by_hand = 2 * (4 * 64 * 64 + 64 * 8 + 2 * 3 * 64 * 32) + 64 * 256
  assert bench_lm.active_params(s) == by_hand
  assert bench_lm.flops_per_token(s, 32) == 6 * by_hand + 12 * 2 * 32 * 64
  out = tmp_path / "lm.json"
  run = subprocess.run([sys.executable, "-m", "experiments.bench_lm", "--size=tiny", "--steps=4",
                        "--window=2", "--warmup=1", "--peak_tflops=1", f"--json={out}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  summary = json.loads(out.read_text())
  skipped = 2 * (8 - 2) * 3 * 64 * 32
  norms = (2 * 2 + 1) * 64
  assert summary["params"] - 256 * 64 - norms - skipped == by_hand
  assert len(summary["window_ms"]) == 2 and summary["step_ms"] > 0
  assert summary["mfu"] == summary["model_tflops"] / 1.0 and "MFU" in run.stdout
