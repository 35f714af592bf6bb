#!/usr/bin/env bash
# The GPU check: run on a machine with an NVIDIA GPU and the CUDA toolkit (nvcc, cmake, ninja,
# scikit-build-core). It gets a CUDA build of llama-cpp-python, then runs scripts/gpu_check.py:
# NVML discovery, full offload of generated models (estimate against measurement), the VRAM-only
# refusal, reload timings from disk and from the RAM staging cache, what the mesh adds to a
# stream, and batched throughput at 1/8/32 streams. See docs/operators.md.
#
#   scripts/gpu_check.sh [--sdist PATH | --engine-wheel PATH] [--wheels DIR] [--out DIR]
#                        [--phases nvml,engine,poolmanager,relay,concurrency,prefix]
#
#   --sdist PATH         build llama-cpp-python with CUDA from this source archive (no network)
#   --engine-wheel PATH  install this CUDA build instead of building one
#   --engine-archive PATH  a .tgz of an installed CUDA llama_cpp package, unpacked as is
#   --wheels DIR         install the Python dependencies from these wheels (machines offline)
#   --out DIR            where results (and a freshly built wheel) go; default ./gpu-check-out
# Without --sdist or --engine-wheel the llama-cpp-python already installed is used.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
SDIST="" ENGINE_WHEEL="" ENGINE_ARCHIVE="" WHEELS="" OUT_DIR="$PWD/gpu-check-out" PHASES="nvml,engine,poolmanager,relay,concurrency,prefix"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --sdist) SDIST="$2"; shift 2 ;;
    --engine-wheel) ENGINE_WHEEL="$2"; shift 2 ;;
    --engine-archive) ENGINE_ARCHIVE="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    --phases) PHASES="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT_DIR"
SITE="$(mktemp -d /tmp/llorch-gpu-site.XXXX)"
export PYTHONPATH="$SITE:$REPO:$REPO/gen${PYTHONPATH:+:$PYTHONPATH}"
export PATH="/usr/local/cuda/bin:$PATH"

if [[ -n "$WHEELS" ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
fi

if [[ -n "$SDIST" ]]; then
  # One architecture (the GPU's own) and no FlashAttention kernels keep the build to minutes.
  ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)"
  export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${ARCH} -DGGML_CUDA_FA=OFF \
-DGGML_CUDA_NCCL=OFF -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF"
  export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
  echo "building llama-cpp-python with CUDA (sm_${ARCH}) from $SDIST"
  start=$(date +%s)
  "$PYTHON" -m pip wheel -q --no-build-isolation --no-deps --no-cache-dir -w "$OUT_DIR" "$SDIST"
  echo "{\"check\": \"engine_build\", \"seconds\": $(( $(date +%s) - start )), \"arch\": \"sm_${ARCH}\"}" \
    | tee -a "$OUT_DIR/gpu_check.jsonl"
  ENGINE_WHEEL="$(ls "$OUT_DIR"/llama_cpp_python-*.whl | head -1)"
fi
if [[ -n "$ENGINE_WHEEL" ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$ENGINE_WHEEL"
fi

if [[ -n "$ENGINE_ARCHIVE" ]]; then
  tar xzf "$ENGINE_ARCHIVE" -C "$SITE"
fi

cd "$REPO"
exec "$PYTHON" scripts/gpu_check.py --out "$OUT_DIR" --phases "$PHASES"
