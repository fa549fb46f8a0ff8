#!/usr/bin/env bash
# One-shot GPU check (~10 minutes on an H100/H200): set up, build the CUDA artifacts, run the gpu
# tests and the GPU benchmark. For a machine with an NVIDIA GPU and its driver.
#
# Python: a venv (.venv-gpu) that sees the system's packages, so a CUDA build of torch already
# installed there is the benchmark's cuBLAS baseline; otherwise pip installs torch==2.13.0 from
# PyPI (its default Linux wheels are CUDA builds). Offline machines: put the wheels of
# apache-tvm==0.27.0.post1 and apache-tvm-ffi (and torch, if none is installed) in $WHEELS.
# nvcc (CUDA 12.x/13.x toolkit) must be on PATH: frugalrt compiles its kernels ahead of time.
# Results: $OUT (default build/gpu-check): pytest log, benchmark table and JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-check}
VENV=${VENV:-.venv-gpu}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader \
  || echo "[gpu_check] nvidia-smi not found: the gpu tests will say what is missing"
command -v nvcc >/dev/null || { echo "[gpu_check] nvcc not on PATH: install the CUDA toolkit (or pip nvidia-cuda-nvcc)"; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv --system-site-packages "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q)
[ -d "$WHEELS" ] && PIP+=(--no-index --find-links "$WHEELS")
"$VENV/bin/python" -c "import tvm" 2>/dev/null || "${PIP[@]}" "apache-tvm==0.27.0.post1"
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" -c "import pytest" 2>/dev/null || "${PIP[@]}" pytest
"$VENV/bin/python" - <<'EOF'
import torch
from frugalrt.runtime.cuda_device import cuda_problem
print("[gpu_check] torch", torch.__version__, "cuda" if torch.cuda.is_available() else "CPU only (baselines left out)")
print("[gpu_check] TVM CUDA:", cuda_problem() or "ok")
EOF

export PYTHONUNBUFFERED=1
# compile tier of the CUDA targets, then every gpu test (exactness, digits vs PyTorch, bad inputs)
timeout 420 "$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider tests/targets/test_cuda.py \
  2>&1 | tee "$OUT/pytest.log"
timeout 300 "$VENV/bin/python" -m benchmarks --only gpu --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
