#!/usr/bin/env bash
# The one prepared GPU check, run in one call of the device tool (budget: under 8 minutes on one
# H100/H200). Figures land under $OUT (or bench/results/gpu):
#   1. every CuPy-vs-NumPy test (pytest -m gpu: the EMC engine's dense and CSR kernels, merge,
#      sharpening, a GPU run against a CPU run; common lines; the per-frame latent posterior; ...)
#   2. EMC 2D: s/iteration for 10^5 frames x 200 classes x 90 rotations at 128^2 (2000 photons),
#      the executed FLOP rate as a share of a measured SGEMM, and 2 MPI ranks sharing the GPU
#   3. EMC 2D on the demo (s/iteration, purity) on the GPU
#   4. the common-line matrix of 10,000 synthetic averages on the GPU
#   5. spiscape place on the GPU (only when results/demo is carried to the device)
#   6. the 3D EMC on the demo on the GPU (K 2, num_div 4; Dragonfly not run on the device), and
#      on 10^5 frames (the demo's photon file given 25 times), K 4, num_div 4: s/iteration
#   7. phasing the demo's 25 truth volumes on the GPU: random starts, the neural phaser alone
#      and refined (s/volume; needs results/demo carried)
#   8. amortised inference on the GPU: training frames/s of spiscape amortise on the demo's
#      frames (batch 512, bf16 autocast; goal >= 10,000 frames/s) and the refinement's frames/s
#      (needs results/demo carried: its VAE is the warm start)
# Each step has its own time limit and a failure does not stop the later steps.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
make .venv/bin/.installed TORCH_SPEC="${TORCH_SPEC:-torch}" >"$out/install.log" 2>&1
.venv/bin/python -m pip install --quiet "cupy-cuda12x" >>"$out/install.log" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout 120 .venv/bin/python -m pytest -m gpu -q -rs 2>&1 | tee "$out/pytest_gpu.txt"
timeout 200 .venv/bin/python bench/emc.py --gpu-figure --device gpu \
    --out "$out/emc_gpu_figure.json" 2>&1 | tail -n 25 | tee "$out/emc_gpu_figure.txt"
timeout 90 .venv/bin/python bench/emc.py --device gpu --iterations 20 \
    --out "$out/emc_gpu.json" 2>&1 | tail -n 12 | tee "$out/emc_gpu.txt"
timeout 90 .venv/bin/python bench/commonlines.py --no-dragonfly --device gpu --large 10000 \
    --out "$out/commonlines_gpu.json" 2>&1 | tail -n 20 | tee "$out/commonlines_gpu.txt"
# 5. placement of the demo's frames on its landscape on the GPU (needs make run's results/demo)
if [ -d results/demo ]; then
    timeout 60 .venv/bin/python bench/place.py --device gpu --out "$out/place_gpu.json" 2>&1 \
        | tail -n 16 | tee "$out/place_gpu.txt"
fi
# 6. the multi-model 3D EMC on the GPU
timeout 120 .venv/bin/python bench/emc3d.py --datasets demo --num-div 4 --iterations 6 \
    --device gpu --no-dragonfly --json "$out/emc3d_gpu.json" --tmp "$out/emc3d_runs" 2>&1 \
    | tail -n 6 | tee "$out/emc3d_gpu.txt"
if [ -f bench/results/data/photons.h5 ]; then
    # shellcheck disable=SC2046
    timeout 240 .venv/bin/python -m spiscape emc3d --photons $(printf 'bench/results/data/photons.h5 %.0s' $(seq 25)) \
        --detector bench/results/data/detector.h5 --out "$out/emc3d_1e5.h5" --num-models 4 \
        --num-div 4 --iterations 3 --device gpu 2>&1 | tail -n 5 | tee "$out/emc3d_1e5.txt"
    .venv/bin/python -c "import sys; sys.path.insert(0, 'src'); from spiscape.io.emc3d import read_emc3d; \
r = read_emc3d('$out/emc3d_1e5.h5', volumes=False); \
print('emc3d 10^5 frames, K 4 x', r.attrs['num_orientations'], 'orientations: s/iteration', \
[round(float(s), 2) for s in r.log['seconds']])" 2>&1 | tee -a "$out/emc3d_1e5.txt"
fi
# 7. phasing methods on the GPU
if [ -d results/demo ]; then
    timeout 120 .venv/bin/python bench/phasing.py --device gpu --vae-results "" \
        --json "$out/phasing_gpu.json" 2>&1 | tail -n 6 | tee "$out/phasing_gpu.txt"
fi
# 8. amortised inference on the GPU
if [ -f results/demo/vae/model.pt ]; then
    timeout 150 .venv/bin/python -m spiscape amortise --photons results/demo/data/photons.h5 \
        --detector results/demo/data/detector.h5 --init-vae results/demo/vae/model.pt \
        --out-dir "$out/amortise_gpu" --epochs 3 --batch-size 512 --device cuda \
        --truth results/demo/data/truth.h5 --no-figures 2>&1 | tail -n 8 \
        | tee "$out/amortise_gpu.txt"
fi
echo "GPU check done: $out"
