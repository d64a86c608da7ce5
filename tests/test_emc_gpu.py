"""The CuPy path of EMC against its NumPy reference (skipped where no GPU is usable)."""

from __future__ import annotations

import numpy as np
import pytest

from spiscape.emc import EMC2D, EMCParams, geometry, kernels

cupy = pytest.importorskip("cupy")
try:
    HAS_GPU = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:  # noqa: BLE001 - a CuPy without a driver
    HAS_GPU = False
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")]


def test_kernels_match_numpy():
    rng = np.random.default_rng(0)
    size, num_rot, m = 19, 6, 3
    cx, cy = rng.uniform(-6, 6, 40), rng.uniform(-6, 6, 40)
    table = geometry.rotation_table(cx, cy, geometry.rotation_angles(num_rot, True), size)
    models = rng.uniform(0.5, 2, (m, size * size)).astype(np.float32)
    counts = rng.poisson(1.0, (20, 40)).astype(np.float32)
    scale, beta = rng.uniform(0.5, 1.5, 20), np.full(20, 0.3)
    results = []
    for xp in (np, cupy):
        op = kernels.view_operator(table.index, table.weight, size, xp)
        views = kernels.expand(xp.asarray(models), op, num_rot)
        flat = views.reshape(m * num_rot, -1)
        res = kernels.e_step_block(
            xp.asarray(counts), xp.asarray(counts), kernels.log_views(flat, xp).T.copy(),
            flat.sum(1).astype(xp.float64), xp.asarray(scale), xp.asarray(beta), xp,
        )
        merged = kernels.merge(res.numerator.reshape(m, num_rot, -1), op)
        weights = xp.broadcast_to(res.denominator.reshape(m, num_rot, 1).astype(xp.float32),
                                  views.shape)
        sharp = kernels.ml_update(xp.asarray(models), views,
                                  res.numerator.reshape(m, num_rot, -1),
                                  kernels.merge(xp.ascontiguousarray(weights), op), op, 5, xp)
        results.append([np.asarray(getattr(x, "get", lambda x=x: x)()) for x in
                        (views, res.occupancies, res.numerator, res.new_scale, merged, sharp)])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6)


def test_gpu_run_matches_cpu_run(tiny_dataset, tmp_path):
    out = {}
    for device in ("cpu", "gpu"):
        params = EMCParams(num_classes=3, num_rot=8, iterations=4, device=device)
        emc = EMC2D([tiny_dataset / "photons.h5"], tiny_dataset / "detector.h5", params)
        out[device] = emc.run(tmp_path / f"{device}.h5")
    np.testing.assert_allclose(out["gpu"].models, out["cpu"].models, rtol=1e-3, atol=1e-6)
