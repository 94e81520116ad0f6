#!/usr/bin/env bash
# Set up .venv for qwen-quant on a fresh machine (Python 3.11+, PyPI only).
# torch first, pinned to the CPU wheel this machine kind has on disk, so no other requirement pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# llama-cpp-python builds from source (about 5 minutes on 2 cores, cached by pip afterwards);
# GGML_NATIVE=OFF makes the cached wheel portable to any x86-64 machine.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
pip install -q -e ".[all]"
echo "qwen-quant installed in $(pwd)/.venv"
