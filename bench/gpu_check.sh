#!/usr/bin/env bash
# The one prepared GPU check (run it in one call of the device tool, about 6 minutes on an H100):
# every CuPy-vs-NumPy test, then the GPU benchmarks of the EMC and common lines, figures under
# $OUT (or bench/results/gpu). Installs the gpu extra into the project's venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
make .venv/bin/.installed TORCH_SPEC="${TORCH_SPEC:-torch}" >"$out/install.log" 2>&1
.venv/bin/python -m pip install --quiet "cupy-cuda12x" >>"$out/install.log" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# 1. every kernel against its NumPy reference (marked gpu; skipped where no device is seen)
.venv/bin/python -m pytest -m gpu -q -rs 2>&1 | tee "$out/pytest_gpu.txt"
# 2. EMC 2D on the demo dataset on the GPU (s/iteration, class purity) and on the CPU beside it
timeout 240 .venv/bin/python bench/emc.py --device gpu --iterations 20 \
    --out "$out/emc_gpu.json" 2>&1 | tail -n 20 | tee "$out/emc_gpu.txt"
# 3. common lines of 1000 synthetic averages on the GPU
timeout 120 .venv/bin/python bench/commonlines.py --no-dragonfly --device gpu \
    --out "$out/commonlines_gpu.json" 2>&1 | tail -n 20 | tee "$out/commonlines_gpu.txt" || true
echo "GPU check done: $out"
