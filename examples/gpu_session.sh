#!/usr/bin/env bash
# A GPU session's checks and benchmarks, ready to run (docs/BENCHMARKS.md "Coder on GPU").
#
#   bash examples/gpu_session.sh wheels            # here, with PyPI: Python 3.12 wheels -> .whl/
#   bash examples/gpu_session.sh run [STEP...]     # on the GPU machine, repo root, .whl/ beside it
#
# The GPU machines have torch, Triton, numpy, xxhash, safetensors, transformers and pytest,
# but no lmdb or zstandard, and no PyPI: `wheels` downloads those two for the machine's
# Python 3.12, `run` installs them into /tmp/speckv-site and runs the project from this
# checkout (the package-dir mapping is recreated with two symlinks, as in a worktree).
#
# Steps (default: all, in this order; each stops at its own time limit and logs to
# $OUT/STEP.log, $OUT defaulting to ./gpu-out):
#   tests     the GPU-marked tests (CUDA vs CPU bytes, predictors on CUDA)      ~ 5 min
#   selfcheck the Triton coder's (and page hash's) own check against the torch reference ~ 2 min
#   kernels   examples/bench_kernels.py: kernel GB/s over batch sizes, bf16 + fp8
#   restore   examples/bench_restore.py: restore vs prefill at 16,384 tokens, bf16 + fp8
# A device call runs at most 10 minutes: give it one or two steps at a time.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(lmdb==3.0.0 zstandard==0.25.0)

case "${1:-}" in
wheels)
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
  ls .whl
  ;;
run)
  shift
  steps=("$@")
  [ ${#steps[@]} -gt 0 ] || steps=(tests selfcheck kernels restore)
  out="${OUT:-gpu-out}"
  mkdir -p "$out"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/speckv-site .whl/*.whl || exit 1
  ln -sfn ../kernels sglang_speckv/kernels
  ln -sfn ../storage sglang_speckv/storage
  export PYTHONPATH="$PWD:/tmp/speckv-site" PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
  for step in "${steps[@]}"; do
    echo "== $step"
    case "$step" in
    tests) timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider \
             tests/test_rans_triton.py tests/test_page_hash.py tests/test_predictors.py tests/test_predictor_devices.py ;;
    selfcheck) timeout 300 python3 -m sglang_speckv.kernels.rans_triton && timeout 60 python3 -m sglang_speckv.kernels.page_hash_triton ;;
    kernels) timeout 420 python3 examples/bench_kernels.py --pages 1 4 16 64 --tokens 64 ;;
    restore) for dtype in bf16 fp8_e4m3; do timeout 280 python3 examples/bench_restore.py --kv-dtype "$dtype"; done ;;
    *) echo "unknown step $step (tests, selfcheck, kernels, restore)"; exit 2 ;;
    esac 2>&1 | tee "$out/$step.log"
  done
  ;;
*)
  sed -n '2,18p' "$0"
  exit 2
  ;;
esac
