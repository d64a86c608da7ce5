"""The CuPy path of EMC against its NumPy reference (skipped where no GPU is usable)."""

from __future__ import annotations

import numpy as np
import pytest

from spiscape.emc import EMC2D, EMCParams, geometry, kernels

pytestmark = pytest.mark.gpu  # each test takes the `cupy` fixture (skipped without a GPU)


def test_kernels_match_numpy(cupy):
    # every kernel of the engine on CuPy (cuBLAS, cuSPARSE) against NumPy/SciPy, with a dense
    # chunk and a CSR chunk of pixels
    import cupyx.scipy.sparse
    import scipy.sparse

    rng = np.random.default_rng(0)
    size, num_rot, m, npix = 19, 6, 3, 40
    cx, cy = rng.uniform(-6, 6, npix), rng.uniform(-6, 6, npix)
    table = geometry.rotation_table(cx, cy, geometry.rotation_angles(num_rot, True), size)
    models = rng.uniform(0.5, 2, (m, size * size)).astype(np.float32)
    counts = rng.poisson(0.3, (20, npix)).astype(np.float32)
    scale, beta = rng.uniform(0.5, 1.5, 20).astype(np.float32), np.full(20, 0.3)
    used = np.ones(npix, dtype=bool)
    used[:3] = False
    op_np = kernels.pixel_major_operator(table.index, table.weight, size)
    results = []
    for xp in (np, cupy):
        csr = scipy.sparse.csr_matrix if xp is np else (
            lambda a: cupyx.scipy.sparse.csr_matrix(scipy.sparse.csr_matrix(a)))
        models_t = xp.asarray(np.ascontiguousarray(models.T))
        parts, parts_t, log_views, merge_ops = [], [], [], []
        for lo, hi, dense in ((0, 25, True), (25, npix, False)):
            block = counts[:, lo:hi]
            parts.append(xp.asarray(block) if dense else csr(block))
            parts_t.append(parts[-1].T if dense else csr(block.T))
            rows = op_np[lo * num_rot:hi * num_rot]
            lw = xp.log(kernels.view_operator_on(rows, xp) @ models_t).reshape(hi - lo, -1)
            lw[xp.asarray(~used[lo:hi])] = 0
            log_views.append(lw.astype(xp.float32))
            merge_ops.append(kernels.view_operator_on(rows.T.tocsr(), xp))
        view_sums = (kernels.rotation_sums(op_np, num_rot, used, xp) @ models_t).ravel()
        log_r = kernels.block_log_likelihood(parts, log_views, view_sums, xp.asarray(scale), xp)
        prob, logsum, info = kernels.responsibilities(log_r.copy(), xp.asarray(beta), xp)
        grid = kernels.merge_numerators(kernels.block_numerators(parts_t, prob, xp),
                                        merge_ops, m)
        op = kernels.view_operator(table.index, table.weight, size, xp)
        views = kernels.expand(xp.asarray(models), op, num_rot)
        sharp = kernels.ml_update(xp.asarray(models), views, views * 0.9,
                                  kernels.merge(xp.ones_like(views), op), op, 5, xp)
        results.append([np.asarray(getattr(x, "get", lambda x=x: x)()) for x in
                        (log_r, prob, logsum, info, grid, views, sharp)])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-5 * max(1.0, np.abs(a).max()))


def test_gpu_run_matches_cpu_run(cupy, tiny_dataset, tmp_path):
    out = {}
    for device in ("cpu", "gpu"):
        params = EMCParams(num_classes=3, num_rot=8, iterations=4, device=device,
                           sparse_below=0.2)  # dense and CSR pixels on both
        emc = EMC2D([tiny_dataset / "photons.h5"], tiny_dataset / "detector.h5", params)
        out[device] = emc.run(tmp_path / f"{device}.h5")
    np.testing.assert_allclose(out["gpu"].models, out["cpu"].models, rtol=1e-3, atol=1e-6)
