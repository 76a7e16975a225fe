#!/usr/bin/env bash
# Downloads, here (where pip reaches PyPI), the wheels the GPU machine lacks for the
# `tokamax` peer rows of the layer benchmark: tokamax and what `import tokamax` needs
# beyond that machine's image (jax 0.11.2 CUDA, flax, absl, numpy, protobuf, tqdm,
# jaxtyping there already). Python 3.12, x86_64 manylinux. ~38 MB into .whl/ (git-ignored);
# run_gpu_checks.sh installs them when .whl/ is there: carry it (`carry: [".whl"]`).
# Checked on 2026-12-01 in a Python 3.12 venv with jax 0.11.2 (CPU): import tokamax and
# tokamax.ragged_dot run with exactly these.
#   bash kernels_pallas/fetch_gpu_wheels.sh [DIR]
set -euo pipefail
dir=${1:-.whl}
mkdir -p "$dir"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
  tokamax==0.0.17 einshape==1.0 qwix==0.1.8 immutabledict==4.3.1 tensorboardx==2.6.5 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 xprof==2.24.2 fire==0.7.1 termcolor==3.3.0 six==1.17.0
ls -la "$dir"
