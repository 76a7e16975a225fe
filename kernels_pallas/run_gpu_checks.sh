#!/usr/bin/env bash
# One command for the accelerator: kernel correctness, gmm tile sweep, layer and scaling
# benchmarks. Needs only jax (CUDA), flax, absl, numpy on the machine.
#   bash kernels_pallas/run_gpu_checks.sh [OUT_DIR]
# Writes logs and JSON to OUT_DIR; each step runs even if an earlier one fails.
set -uo pipefail
out=${1:-${OUT:-bench_out}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -m kernels_pallas.check_gpu 2>&1 | tee "$out/check_gpu.log"
python3 -m experiments.check_gpu_dispatch 2>&1 | tee "$out/check_gpu_dispatch.log"
python3 -m kernels_pallas.bench_gmm --shapes=gpu --sweep 2>&1 | tee "$out/bench_gmm.log"
python3 -m experiments.bench --suite=layer --shapes=gpu --max_row_s=10 \
  --variants=dense_equiv,einsum,sorted,tiled,pallas,pallas_fused,tokamax \
  --json="$out/layer_gpu.json" 2>&1 | grep -v "^I1" | tee "$out/bench_layer.log"
python3 -m experiments.bench --suite=scaling --shapes=gpu --modes=fwd_bwd --max_row_s=5 \
  --variants=dense_equiv,pallas --json="$out/scaling_gpu.json" 2>&1 | grep -v "^I1" \
  | tee "$out/bench_scaling.log"
