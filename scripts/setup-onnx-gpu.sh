#!/usr/bin/env bash
# Swap the CPU onnxruntime in .venv for onnxruntime-gpu (CUDA 13 builds from 1.31), so
# `qwen-quant eval EXPORT --backend onnxruntime --device cuda` runs on the CUDA execution provider.
# Both wheels install the same `onnxruntime` package, so the CPU one is removed first; the GPU wheel
# then satisfies the `onnxruntime` import qwen-quant needs. Undo: bash scripts/setup.sh after
# `pip uninstall -y onnxruntime-gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
.venv/bin/python -m pip uninstall -q -y onnxruntime
.venv/bin/python -m pip install -q "onnxruntime-gpu${ORT_GPU_VERSION:->=1.31}"
.venv/bin/python -c "import onnxruntime as o; p = o.get_available_providers(); print('onnxruntime', o.__version__, p); \
  assert 'CUDAExecutionProvider' in p, 'no CUDAExecutionProvider: is a CUDA 13 driver and runtime installed?'"
