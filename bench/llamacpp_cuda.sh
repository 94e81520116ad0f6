#!/usr/bin/env bash
# llama.cpp with CUDA on one GPU: build llama-cpp-python with CUDA, make a 7B-shaped q4_k_m GGUF,
# and evaluate it with all layers offloaded (CUDA row) against llama.cpp on the CPU (CPU row), in ONE call.
#
#   bash bench/llamacpp_cuda.sh pack            # here (has network): sdist + build wheels -> build/llamacpp-cuda/ (~47 MB)
#   bash bench/llamacpp_cuda.sh gpu [RUN ARGS]  # on the GPU machine (no network needed), in one run;
#                                               # SHAPE=qwen2-7b picks another shape (default qwen1.5-7b)
#   bash bench/llamacpp_cuda.sh smoke           # here, on the CPU: the eval half with the installed CPU wheel
#
# On the GPU machine (copy there first: build/llamacpp-cuda, .device-wheels/project, .device-wheels/qwen2-tokenizer):
#   bash bench/llamacpp_cuda.sh gpu --tokens 4096
# `gpu` also leaves a stripped, xz-packed copy of the CUDA build in $OUT (lcpp-prebuilt.tar.xz.part00..,
# ~40 MB in 15 MiB parts). Copy those parts into build/lcpp-prebuilt/ here and the next call skips the
# 6-minute build (copy build/lcpp-prebuilt and build/llamacpp-cuda/wheels instead of build/llamacpp-cuda).
#
# Why a repacked sdist: a GPU machine without network gets its files copied over, and the smaller the better. The
# llama-cpp-python 0.3.36 sdist is 76 MB; most of it is llama.cpp's model vocab files, docs, web UI and
# backends we do not build. `pack` deletes those (the list is below) and keeps everything CMake reads with
# -DGGML_CUDA=on -DLLAVA_BUILD=OFF, which leaves ~46 MB. The folder build/ is git-ignored (`/build/`).
#
# Build flags (gpu): -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 (H100/H200 only: one arch keeps the
# build near 6 minutes on 16 cores) -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF (no multimodal library), and a
# portable CPU backend: -DGGML_NATIVE=OFF with AVX2/FMA/F16C/BMI2, so the packed copy runs on whichever
# x86-64 host the next call lands on (the CPU row is therefore an AVX2 row, not AVX-512/AMX). Installed
# with --no-build-isolation from carried wheels (scikit-build-core, pathspec, diskcache) into /tmp/lcpp,
# never into the image's site-packages.
#
# The load crash seen on the first attempts (SIGSEGV in libggml-cuda.so on every model load) is
# libllama binding to weak libstdc++ copies exported by libggml-cuda.so; `import qwen_quant` fixes it
# (qwen_quant/_native.py). A bare `llama_cpp.Llama` outside our package needs LD_PRELOAD=libstdc++.so.6.
set -euo pipefail
cd "$(dirname "$0")/.."
VER=0.3.36
DIR=build/llamacpp-cuda
SDIST=$DIR/llama_cpp_python-$VER-cuda-src.tar.gz
# Not needed to build the libraries: vocab test files, docs, media, benchmarks, web UI/server, examples,
# python tooling, tests, and every ggml GPU backend other than CUDA (their CMake is only read when enabled).
DROP="models docs media benches build tools/ui tools/server examples gguf-py tests pocs
  ggml/src/ggml-vulkan ggml/src/ggml-sycl ggml/src/ggml-metal ggml/src/ggml-opencl ggml/src/ggml-hexagon
  ggml/src/ggml-cann ggml/src/ggml-openvino ggml/src/ggml-webgpu ggml/src/ggml-et ggml/src/ggml-virtgpu
  ggml/src/ggml-zdnn ggml/src/ggml-zendnn"

pack() {
  rm -rf "$DIR" && mkdir -p "$DIR/wheels" "$DIR/src"
  pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$DIR/src"
  tar xzf "$DIR/src/llama_cpp_python-$VER.tar.gz" -C "$DIR/src"
  local root="$DIR/src/llama_cpp_python-$VER"
  for d in $DROP; do rm -rf "$root/vendor/llama.cpp/$d"; done
  tar czf "$SDIST" -C "$DIR/src" "llama_cpp_python-$VER"
  rm -rf "$DIR/src"
  # build backend + runtime deps the GPU image lacks (it has numpy, jinja2, typing-extensions, packaging)
  pip download -q --no-deps --only-binary :all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d "$DIR/wheels" \
    scikit-build-core pathspec packaging diskcache
  du -sh "$DIR" "$SDIST"
}

gpu() {
  local t0=$SECONDS out=${OUT:-/tmp/out}
  mkdir -p "$out" /tmp/lcpp /tmp/bdeps /tmp/proj
  python3 -m pip install -q --no-index --no-deps --target /tmp/bdeps "$DIR"/wheels/*.whl
  python3 -m pip install -q --no-index --no-deps --target /tmp/proj .device-wheels/project/*.whl
  export PYTHONPATH=/tmp/lcpp:/tmp/proj:/tmp/bdeps:$(pwd)
  # the Qwen2 tokenizer: ../shared/fixtures when it travels, else the carried copy
  if [ -z "${QWEN_QUANT_TOKENIZER:-}" ] && [ ! -f ../shared/fixtures/qwen2-tokenizer/tokenizer.json ]; then
    export QWEN_QUANT_TOKENIZER=$(pwd)/.device-wheels/qwen2-tokenizer
  fi
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}  # libcudart/libcublas for libggml-cuda
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  # the float GGUF needs only gguf + torch: write it while llama.cpp compiles
  python3 bench/llamacpp_cuda.py make-f16 --shape "${SHAPE:-qwen1.5-7b}" --out /tmp/m/model-f16.gguf > "$out/make-f16.log" 2>&1 &
  local maker=$!
  local b0=$SECONDS build_s=""
  if ls build/lcpp-prebuilt/lcpp-prebuilt.tar.xz.part* >/dev/null 2>&1; then
    cat build/lcpp-prebuilt/lcpp-prebuilt.tar.xz.part* | xz -d | tar x -C /tmp/lcpp || exit 3
    echo "llama-cpp-python CUDA build: unpacked the prebuilt copy in $((SECONDS - b0))s"
  else
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=16 MAKEFLAGS=-j16 \
      python3 -m pip install --no-index --no-deps --no-build-isolation --target /tmp/lcpp "$SDIST" > "$out/build.log" 2>&1 \
      || { tail -40 "$out/build.log"; exit 3; }
    build_s=$((SECONDS - b0))
    echo "llama-cpp-python CUDA build: ${build_s}s"
    pack_prebuilt "$out" &
  fi
  wait $maker || { cat "$out/make-f16.log"; exit 3; }
  tail -3 "$out/make-f16.log"
  echo "model ready at ${SECONDS}s"
  local rc=0
  python3 bench/llamacpp_cuda.py run --shape "${SHAPE:-qwen1.5-7b}" --f16 /tmp/m/model-f16.gguf ${build_s:+--build-seconds "$build_s"} \
    --json "$out/llamacpp-cuda.json" "$@" || rc=$?
  wait || true  # the prebuilt packer
  echo "total ${SECONDS}s (started $t0)"
  return $rc
}

pack_prebuilt() {  # one stripped file per library, links for its other names, xz, 15 MiB parts into $1
  rm -rf /tmp/pk && mkdir -p /tmp/pk && cp -r /tmp/lcpp/llama_cpp /tmp/pk/ || return
  (cd /tmp/pk/llama_cpp/lib && for f in *.so.0; do b=${f%.so.0}; rm -f "$b.so" "$b".so.0.*; strip --strip-unneeded "$f"; ln -s "$f" "$b.so"; done)
  tar cf - -C /tmp/pk llama_cpp | xz -T0 -6 > /tmp/lcpp-prebuilt.tar.xz && split -b 15M -d /tmp/lcpp-prebuilt.tar.xz "$1/lcpp-prebuilt.tar.xz.part"
}

case "${1:-}" in
  pack) pack ;;
  gpu) shift; gpu "$@" ;;
  smoke) shift; PY=${PY:-.venv/bin/python}; $PY bench/llamacpp_cuda.py smoke "$@" ;;
  *) echo "usage: $0 pack | gpu [run args, e.g. --tokens 8192] | smoke [--inject-garbage]" >&2; exit 2 ;;
esac
