"""The CuPy path of the 3D EMC against its NumPy reference (skipped where no GPU is usable)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu  # each test takes the `cupy` fixture (skipped without a GPU)


@pytest.mark.parametrize("merge", ["tomograms", "photons"])
def test_emc3d_iterations_on_the_gpu_match_numpy(cupy, tiny_dataset, merge):
    """Slices (cupyx CSR), the E-step products, responsibilities and both M-steps on CuPy: three
    iterations from the same start give the CPU's models and the same per-frame choices."""
    from spiscape.emc3d.run import EMC3D, EMC3DParams

    data, det = [tiny_dataset / "photons.h5"], tiny_dataset / "detector.h5"
    results = []
    for device in ("cpu", "gpu"):
        emc = EMC3D(data, det, EMC3DParams(num_models=2, num_div=2, iterations=3, seed=2,
                                           device=device, merge=merge))
        state = emc.initial_state()
        for _ in range(2):
            state, _ = emc.iterate(state)
        state, row, frames = emc.iterate(state, collect=True)
        results.append((state, row, frames))
    (cpu, cpu_row, cpu_frames), (gpu, gpu_row, gpu_frames) = results
    np.testing.assert_allclose(gpu.models, cpu.models, rtol=2e-3, atol=1e-6 * cpu.models.max())
    np.testing.assert_allclose(gpu.scale, cpu.scale, rtol=1e-3)
    assert np.mean(gpu_frames["model"] == cpu_frames["model"]) > 0.99
    assert np.mean(gpu_frames["orientation"] == cpu_frames["orientation"]) > 0.95
    assert abs(gpu_row["log_likelihood"] - cpu_row["log_likelihood"]) < 1e-3 * abs(
        cpu_row["log_likelihood"])
