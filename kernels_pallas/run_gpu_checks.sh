#!/usr/bin/env bash
# One command for the accelerator (issue 16, part A): kernel and dispatcher correctness,
# the gmm tile sweep, the layer benchmark with every variant and peer, the scaling suite,
# and a ~1B-parameter MoE LM's step time and MFU. Needs jax (CUDA), flax, optax, absl and
# numpy; tokamax rows need its wheels in .whl/ (kernels_pallas/fetch_gpu_wheels.sh here,
# then carry ".whl"), installed into /tmp/site below.
#   bash kernels_pallas/run_gpu_checks.sh [OUT_DIR]      # at most ~8.5 minutes on one H200
#   DRY=1 bash kernels_pallas/run_gpu_checks.sh OUT_DIR  # the same steps at CPU sizes
# Writes logs and JSON to OUT_DIR; each step has its own time limit and runs even if an
# earlier one failed; the last lines summarise each step's exit status and seconds.
set -uo pipefail
out=${1:-${OUT:-bench_out}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tail -3 && export PYTHONPATH=$PWD:/tmp/site
fi
if [ "${DRY:-0}" = 1 ]; then
  # tokamax on CPU is XLA's ragged_dot (seconds a call): forward only, to fit the limits
  shapes=cpu lm_size=tiny lm_steps=4 variants=dense_equiv,tiled,tokamax scale_variants=dense_equiv,tiled
  layer_modes=fwd
else
  shapes=gpu lm_size=h200_1b lm_steps=100
  variants=dense_equiv,einsum,sorted,tiled,pallas,pallas_fused,tokamax scale_variants=dense_equiv,tiled,pallas
  layer_modes=fwd,fwd_bwd
fi
summary=()
step() {  # step NAME LIMIT_S CMD...: run with a time limit, log to OUT/NAME.log
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | grep -v "^I1" | tee "$out/$name.log"
  summary+=("$name rc=${PIPESTATUS[0]} $((SECONDS - t0))s")
}
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 || true
  $py -c "import jax; print(jax.__version__, jax.devices())"
  $py -c "import tokamax; print('tokamax', tokamax.__version__)" 2>&1 | tail -1; } \
  | tee "$out/gpu.txt"
# Limits add up to 495 s: with a machine's start, inside one 600 s call and a 15-minute budget.
step check_gpu 45 $py -m kernels_pallas.check_gpu
step check_gpu_dispatch 45 $py -m experiments.check_gpu_dispatch
step bench_gmm 45 $py -m kernels_pallas.bench_gmm --shapes=$shapes --sweep
step bench_layer 150 $py -m experiments.bench --suite=layer --shapes=$shapes --max_row_s=4 \
  --iters=10 --modes=$layer_modes --variants=$variants --json="$out/layer.json"
for d in tiled pallas; do
  step bench_lm_$d 75 $py -m experiments.bench_lm --size=$lm_size --steps=$lm_steps --window=10 \
    --dispatch=$d --json="$out/lm_$d.json"
done
step bench_scaling 60 $py -m experiments.bench --suite=scaling --shapes=$shapes --modes=fwd_bwd \
  --max_row_s=3 --iters=10 --variants=$scale_variants --json="$out/scaling.json"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
