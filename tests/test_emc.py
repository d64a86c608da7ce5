"""EMC 2D classification: kernels against direct loops, then the science on simulated frames."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from spiscape import cli
from spiscape.emc import EMC2D, EMCParams, geometry, kernels, replicate_frames
from spiscape.emc.averages import gather_averages
from spiscape.errors import ConfigError, InputError


def bilinear(image, x, y):
    """Reference bilinear interpolation at one point (grid indices)."""
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    fx, fy = x - x0, y - y0
    return (
        image[x0, y0] * (1 - fx) * (1 - fy) + image[x0, y0 + 1] * (1 - fx) * fy
        + image[x0 + 1, y0] * fx * (1 - fy) + image[x0 + 1, y0 + 1] * fx * fy
    )


@pytest.fixture
def small_problem():
    rng = np.random.default_rng(3)
    size, num_rot, m = 11, 5, 3
    cx, cy = rng.uniform(-4, 4, 13), rng.uniform(-4, 4, 13)
    angles = geometry.rotation_angles(num_rot, friedel=False)
    table = geometry.rotation_table(cx, cy, angles, size)
    op = kernels.view_operator(table.index, table.weight, size)
    models = rng.uniform(0.5, 2.0, (m, size, size))
    return dict(size=size, num_rot=num_rot, m=m, cx=cx, cy=cy, angles=angles, op=op,
                models=models, rng=rng)


def test_views_are_bilinear_rotations(small_problem):
    p = small_problem
    views = kernels.expand(p["models"].reshape(p["m"], -1), p["op"], p["num_rot"])
    c = (p["size"] - 1) / 2
    for m in range(p["m"]):
        for r, th in enumerate(p["angles"]):
            for t in range(p["cx"].size):
                x = np.cos(th) * p["cx"][t] - np.sin(th) * p["cy"][t] + c
                y = np.sin(th) * p["cx"][t] + np.cos(th) * p["cy"][t] + c
                assert views[m, r, t] == pytest.approx(bilinear(p["models"][m], x, y), rel=1e-5)


def test_merge_is_the_adjoint_of_the_view(small_problem):
    p = small_problem
    x = p["models"].reshape(p["m"], -1)
    y = p["rng"].normal(size=(p["m"], p["num_rot"], p["cx"].size))
    lhs = np.sum(kernels.expand(x, p["op"], p["num_rot"]) * y)
    rhs = np.sum(x * kernels.merge(y, p["op"]))
    assert lhs == pytest.approx(rhs, rel=1e-5)


def direct_e_and_m_step(views, counts, used, scale, beta):
    """The E-step and M-step sums by loops over frames and views (views (M, R, P) class-major)."""
    m, r, _ = views.shape
    log_r = np.array([[[np.sum(counts[d, used] * np.log(views[i, k, used]))
                        - scale[d] * views[i, k, used].sum() for i in range(m)] for k in range(r)]
                      for d in range(counts.shape[0])]).reshape(counts.shape[0], r * m)
    prob = np.exp(beta[:, None] * (log_r - log_r.max(1, keepdims=True)))
    prob /= prob.sum(1, keepdims=True)
    numerator = np.zeros_like(views)  # (M, R, P): Σ_d P_d(r m) K_dt
    for d in range(counts.shape[0]):
        for k in range(r):
            for i in range(m):
                numerator[i, k] += prob[d, k * m + i] * counts[d]
    return log_r, prob, numerator


@pytest.mark.parametrize("num_dense, max_len", [(13, 13), (0, 13), (5, 4), (9, 2)])
def test_pixel_major_e_and_m_step_match_direct_sums(small_problem, num_dense, max_len):
    # the same sums whichever pixels are dense or CSR and however they are chunked
    import scipy.sparse

    from spiscape.emc.frames import pixel_chunks

    p = small_problem
    rng = p["rng"]
    m, r, size, npix = p["m"], p["num_rot"], p["size"], p["cx"].size
    table = geometry.rotation_table(p["cx"], p["cy"], p["angles"], size)
    op = kernels.pixel_major_operator(table.index, table.weight, size)
    models_t = np.ascontiguousarray(p["models"].reshape(m, -1).T.astype(np.float32))
    views_cm = kernels.expand(p["models"].reshape(m, -1), p["op"], r)  # (M, R, P) reference
    used = np.ones(npix, dtype=bool)
    used[[2, 7]] = False  # merged into the model, not in the likelihood
    counts = rng.poisson(1.0, (6, npix)).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, 6)
    beta = np.full(6, 0.7)
    log_r_ref, prob_ref, num_ref = direct_e_and_m_step(views_cm, counts, used, scale, beta)

    chunks = pixel_chunks(num_dense, npix, max_len)
    parts, parts_t, log_views, merge_ops = [], [], [], []
    for c in chunks:
        block = counts[:, c.start:c.stop]
        part = block if c.dense else scipy.sparse.csr_matrix(block)
        parts.append(part)
        parts_t.append(part.T if c.dense else scipy.sparse.csr_matrix(block.T))
        rows = op[c.start * r:c.stop * r]
        lw = np.log(rows @ models_t).reshape(c.stop - c.start, -1)
        lw[~used[c.start:c.stop]] = 0
        log_views.append(lw.astype(np.float32))
        merge_ops.append(rows.T.tocsr())
    view_sums = (kernels.rotation_sums(op, r, used) @ models_t).ravel()
    log_r = kernels.block_log_likelihood(parts, log_views, view_sums, scale.astype(np.float32), np)
    np.testing.assert_allclose(log_r, log_r_ref, rtol=2e-5, atol=1e-3)
    prob, logsum, mutual_info = kernels.responsibilities(log_r, beta, np)
    np.testing.assert_allclose(prob, prob_ref, rtol=1e-4, atol=1e-7)
    assert mutual_info.sum() == pytest.approx(np.sum(prob_ref * np.log(prob_ref * m * r)),
                                              rel=1e-4)
    grid = kernels.merge_numerators(kernels.block_numerators(parts_t, prob, np), merge_ops, m)
    np.testing.assert_allclose(grid.T, kernels.merge(num_ref, p["op"]), rtol=1e-4, atol=1e-6)
    # the M-step's denominator merged through the rotation sums, never expanded to pixels
    den = rng.uniform(0, 1, (r, m))
    np.testing.assert_allclose(
        den.T @ kernels.rotation_sums(op, r, np.ones(npix)),
        kernels.merge(np.broadcast_to(den.T[:, :, None], (m, r, npix)).copy(), p["op"]),
        rtol=1e-5)


def test_sparse_m_step_matches_dense():
    rng = np.random.default_rng(1)
    prob = (rng.random((50, 40)) ** 600).astype(np.float32)  # the weight on few entries a frame
    prob /= prob.sum(1, keepdims=True)
    counts = rng.poisson(1.0, (50, 30)).astype(np.float32)
    sparse_prob = kernels.sparse_probabilities(prob, np)
    assert sparse_prob is not None and sparse_prob.nnz < 0.05 * prob.size
    import scipy.sparse

    for part_t in (counts.T, scipy.sparse.csr_matrix(counts.T)):
        (num,) = kernels.block_numerators([part_t], prob, np, sparse_prob)
        # only terms below 1e-6 of each frame's largest probability are left out
        np.testing.assert_allclose(num, counts.T @ prob, rtol=1e-4, atol=5e-5)
    assert kernels.sparse_probabilities(np.full((5, 8), 1 / 8, np.float32), np) is None


def test_crossover_puts_dark_pixels_in_csr():
    import scipy.sparse

    from spiscape.emc.frames import measure_crossover

    rng = np.random.default_rng(2)
    sample = scipy.sparse.csr_matrix(rng.poisson(0.05, (256, 4000)).astype(np.float32))
    crossover = measure_crossover(sample, 200)
    # CSR costs more per term than a dense product, but far less than a dense column of zeros
    assert 0.001 < crossover < 1.0


def test_ml_m_step_recovers_a_sharp_model_that_the_merge_blurs():
    # photons that are exactly the views of a sharp model (a peak one pixel wide on a flat
    # floor), at 24 in-plane angles: the ML update converges to the model, the plain merge to
    # its blur
    rng = np.random.default_rng(5)
    size, num_rot = 25, 24
    cx, cy = np.meshgrid(np.arange(-7.0, 8.0), np.arange(-7.0, 8.0), indexing="ij")
    cx, cy = cx.ravel() + 0.3, cy.ravel() - 0.2
    table = geometry.rotation_table(cx, cy, geometry.rotation_angles(num_rot, False), size)
    op = kernels.view_operator(table.index, table.weight, size)
    x, y = np.meshgrid(np.arange(size) - 12.0, np.arange(size) - 12.0, indexing="ij")
    truth = 1.0 + 20.0 * np.exp(-((x - 3) ** 2 + (y - 1) ** 2) / 1.0)
    truth = truth.reshape(1, -1).astype(np.float32)
    weight = rng.uniform(0.5, 2.0, num_rot).astype(np.float32)  # Σ_d P φ per rotation
    numerator = kernels.expand(truth, op, num_rot) * weight[None, :, None]
    grid_den = kernels.merge(np.broadcast_to(weight[None, :, None], numerator.shape).copy(), op)
    measured = (grid_den > 1e-3 * grid_den.max())[0] & (x.ravel() ** 2 + y.ravel() ** 2 < 36)
    merged = kernels.merge(numerator, op) / np.maximum(grid_den, 1e-30)
    start = np.ones_like(truth)
    ml = kernels.ml_update(start, kernels.expand(start, op, num_rot), numerator, grid_den, op,
                           50, np)
    error = {name: np.abs(est[0] - truth[0])[measured].max() / 20.0
             for name, est in (("merge", merged), ("ml", ml))}
    assert error["merge"] > 0.1, error  # the merge blurs the peak
    assert error["ml"] < 0.02, error
    # each ML step raises the expected log-likelihood Σ numerator log W - Σ weight W
    def q_value(model):
        views = kernels.expand(model, op, num_rot)
        return float(np.sum(numerator * np.log(views)) - np.sum(weight[None, :, None] * views))

    values = [q_value(kernels.ml_update(start, kernels.expand(start, op, num_rot), numerator,
                                        grid_den, op, n, np)) for n in (1, 2, 4, 8)]
    assert np.all(np.diff(values) > 0), values


def test_sharpened_average_matches_the_slice_that_the_merge_blurs(tiny_dataset,
                                                                   one_view_photons, tmp_path):
    # one cube orientation at 12 in-plane angles, near-noiseless, one class: the average should
    # be the Ewald slice (at one of the EMC's in-plane angles, which it fixes only up to one)
    import torch

    from spiscape.orient.rotations import to_matrix
    from spiscape.vae.model import ewald_grid, slice_volumes

    det, cube, quat, photons = one_view_photons
    errors, models = {}, {}
    # (iterations, oversampling, photons of half-sharpening): the merge, the ML model everywhere,
    # the default shrinkage (these frames put >= 1e3 photons on most points), and a shrinkage so
    # strong that nothing may change
    for sharpen in ((0, 2, 0), (20, 2, 0), (20, 2, 100), (20, 2, 1e12)):
        params = EMCParams(num_classes=1, num_rot=12, iterations=6, friedel=False,
                           need_scaling=False, seed=1, sharpen_iterations=sharpen[0],
                           sharpen_oversample=sharpen[1], sharpen_photons=sharpen[2])
        emc = EMC2D([photons], tiny_dataset / "detector.h5", params)
        emc.run(tmp_path / "s.h5")
        with h5py.File(tmp_path / "s.h5") as f:
            model, support = f["intens"][0], f["support"][()].astype(bool)
        models[sharpen] = model
        grid = ewald_grid(emc.size, det.detd, det.ewald_rad)
        radius = np.linalg.norm(grid, axis=0)
        keep = support & (radius >= 3) & (radius <= emc.size // 2 - 2)
        best = np.inf
        for turn in emc.angles:
            rot = to_matrix(quat)[0] @ to_matrix([[np.cos(turn / 2), 0, 0, np.sin(turn / 2)]])[0]
            ref = slice_volumes(torch.as_tensor(cube[None], dtype=torch.float32),
                                torch.as_tensor(grid.reshape(3, -1), dtype=torch.float32),
                                torch.as_tensor(rot[None], dtype=torch.float32))[0]
            ref = ref.numpy().reshape(model.shape)[keep]
            ref *= model[keep].sum() / ref.sum()
            best = min(best, np.sqrt(np.mean((model[keep] - ref) ** 2)) / ref.std())
        errors[sharpen] = best
    merge = errors[0, 2, 0]
    assert errors[20, 2, 0] < merge / 2 and errors[20, 2, 0] < 0.08, errors
    assert errors[20, 2, 100] < merge / 2 and errors[20, 2, 100] < 0.08, errors
    np.testing.assert_allclose(models[20, 2, 1e12], models[0, 2, 0], rtol=1e-4,
                               atol=1e-6 * models[0, 2, 0].max())


def test_friedel_symmetry_and_rotation_span():
    models = np.random.default_rng(0).normal(size=(2, 7, 7))
    sym = geometry.friedel_symmetrize(models)
    np.testing.assert_allclose(sym, sym[:, ::-1, ::-1])
    assert geometry.rotation_angles(4, friedel=True)[-1] == pytest.approx(3 * np.pi / 4)
    assert geometry.rotation_angles(4, friedel=False)[-1] == pytest.approx(3 * np.pi / 2)


def test_beta_schedule_anneals_and_caps():
    photons = np.array([100.0, 400.0])
    b0 = kernels.beta_schedule(photons, 0, "auto", 2.0, 3)
    np.testing.assert_allclose(b0, [0.1, 0.05])
    np.testing.assert_allclose(kernels.beta_schedule(photons, 3, "auto", 2.0, 3), [0.2, 0.1])
    assert kernels.beta_schedule(photons, 30, "auto", 2.0, 3).max() == 1.0
    # "mean": one start for every frame, 1/sqrt of the mean count
    np.testing.assert_allclose(kernels.beta_schedule(photons, 0, "mean", 2.0, 3),
                               [250 ** -0.5] * 2)


def test_replicates_are_seeded_subsets():
    a = replicate_frames(1000, 0.8, seed=1, replicate=0)
    assert a.size == 800 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, replicate_frames(1000, 0.8, seed=1, replicate=0))
    assert not np.array_equal(a, replicate_frames(1000, 0.8, seed=1, replicate=1))
    np.testing.assert_array_equal(replicate_frames(10, 1.0, 1, 3), np.arange(10))


def test_impossible_parameters_are_refused():
    with pytest.raises(ConfigError, match="fraction"):
        EMCParams(fraction=0).check()
    with pytest.raises(ConfigError, match="num_classes"):
        EMCParams(num_classes=0).check()
    with pytest.raises(ConfigError, match="sharpen_iterations"):
        EMCParams(sharpen_iterations=-1).check()
    with pytest.raises(ConfigError, match="sharpen_oversample"):
        EMCParams(sharpen_oversample=0).check()
    with pytest.raises(ConfigError, match="sharpen_photons"):
        EMCParams(sharpen_photons=float("nan")).check()


def run_emc(dataset, out, **overrides):
    params = EMCParams(**{"num_classes": 4, "num_rot": 12, "iterations": 12, "seed": 2,
                          **overrides})
    emc = EMC2D([dataset / "photons.h5"], dataset / "detector.h5", params)
    emc.run(out)
    return emc


def test_classification_separates_populations(tiny_dataset, tmp_path):
    out = tmp_path / "rep0.h5"
    run_emc(tiny_dataset, out)
    with h5py.File(out) as f, h5py.File(tiny_dataset / "truth.h5") as t:
        occ, frames, log = f["occupancies"][:], f["frames"][:], f["log"][:]
        labels = t["label"][:][frames]
        assert f["intens"].shape == (4, f.attrs["size"], f.attrs["size"])
        assert f["scale"].shape == frames.shape == f["best_rotation"].shape
    np.testing.assert_allclose(occ.sum(1), 1.0, rtol=1e-5)
    classes = occ.argmax(1)
    # each class is pure: the cubes and the rods never share a class
    majority = np.array([np.bincount(labels[classes == m], minlength=5).argmax()
                         if np.any(classes == m) else -1 for m in range(4)])
    purity = np.mean(majority[classes] == labels)
    assert purity >= 0.95, purity
    assert log["iteration"].tolist() == list(range(1, 13))
    assert log["log_likelihood"][-1] > log["log_likelihood"][0]
    assert log["mutual_info"][-1] > log["mutual_info"][0]


def test_scales_follow_the_fluence(tiny_dataset, tmp_path):
    out = tmp_path / "rep0.h5"
    run_emc(tiny_dataset, out)
    with h5py.File(out) as f, h5py.File(tiny_dataset / "truth.h5") as t:
        scale, frames = f["scale"][:], f["frames"][:]
        classes = f["occupancies"][:].argmax(1)
        fluence = t["scale"][:][frames]
    # within a class (one shape), the fitted scale tracks the incident fluence (Gamma, ±50 %);
    # the few-% size spread (photons ~ size^4 on a slice) and orientation blur the rest
    checked = 0
    for m in np.unique(classes):
        sel = classes == m
        if sel.sum() > 20:
            assert np.corrcoef(scale[sel], fluence[sel])[0, 1] > 0.75
            checked += 1
    assert checked >= 2


def test_bootstrap_replicates_and_gather(tiny_dataset, tmp_path):
    paths = []
    for r in range(2):
        out = tmp_path / f"rep{r}.h5"
        params = EMCParams(num_classes=3, num_rot=8, iterations=3, replicate=r, fraction=0.8)
        EMC2D([tiny_dataset / "photons.h5"], tiny_dataset / "detector.h5", params).run(out)
        paths.append(out)
    with h5py.File(paths[0]) as a, h5py.File(paths[1]) as b:
        assert a["frames"].size == b["frames"].size == 192
        assert not np.array_equal(a["frames"][:], b["frames"][:])
    result = gather_averages(paths, tmp_path / "averages.h5", min_frames=1)
    with h5py.File(tmp_path / "averages.h5") as f:
        assert f["intens"].shape[0] == f["replicate"].size == f["class"].size
        assert set(f["replicate"][:]) == {0, 1}
    assert result.intens.shape[1:] == (result.size,) * 2 and result.count == result.klass.size


def test_gather_refuses_an_empty_or_broken_replicate(tmp_path):
    bad = tmp_path / "rep0.h5"
    with h5py.File(bad, "w") as f:
        f["intens"] = np.full((2, 5, 5), np.nan)
        f["occupancies"] = np.zeros((0, 2))
        f["frames"] = np.zeros(0, dtype=np.int64)
        f.attrs["params"] = "{}"
    with pytest.raises(InputError, match="rep0.h5"):
        gather_averages([bad], tmp_path / "averages.h5")
    assert not (tmp_path / "averages.h5").exists()


def test_cli_runs_and_reports_bad_detector(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "rep.h5"
    code = cli.main(["classify2d", "--photons", str(tiny_dataset / "photons.h5"),
                     "--detector", str(tiny_dataset / "detector.h5"), "--out", str(out),
                     "--num-classes", "2", "--num-rot", "4", "--iterations", "2"])
    assert code == 0 and out.exists()
    assert not out.with_name("rep.ckpt.h5").exists()
    wrong = tmp_path / "det.h5"
    with h5py.File(tiny_dataset / "detector.h5") as src, h5py.File(wrong, "w") as dst:
        for key in ("qx", "qy", "qz", "corr", "mask"):
            dst[key] = src[key][:-3]
        for key in ("detd", "ewald_rad"):
            dst[key] = src[key][()]
    capsys.readouterr()
    code = cli.main(["classify2d", "--photons", str(tiny_dataset / "photons.h5"),
                     "--detector", str(wrong), "--out", str(tmp_path / "bad.h5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "num_pix" in err[-1] and "photons.h5" in err[-1]
    assert not (tmp_path / "bad.h5").exists()


def test_starved_classes_are_reseeded_from_the_most_populated(tiny_dataset):
    params = EMCParams(num_classes=4, num_rot=12, iterations=20, beta_period=5,
                       reseed_share=0.25, seed=2)
    emc = EMC2D([tiny_dataset / "photons.h5"], tiny_dataset / "detector.h5", params)
    models = np.stack([np.full((3, 3), v) for v in (1.0, 2.0, 3.0, 4.0)])
    fair = emc.selection.size / 4
    frames = np.array([0.05, 2.0, 1.8, 0.15]) * fair  # classes 0 and 3 starved
    assert not emc.reseed_due(4) and not emc.reseed_due(15)  # off beat; last two beta levels
    assert emc.reseed(models.copy(), frames, 4) == 0
    out = models.copy()
    assert emc.reseed(out, frames, 5) == 2
    # class 0 copies the largest (1), class 3 the next largest (2), perturbed by a few %
    np.testing.assert_allclose(out[0], models[1], rtol=0.5)
    np.testing.assert_allclose(out[3], models[2], rtol=0.5)
    assert not np.allclose(out[0], models[1]) and not np.allclose(out[3], models[2])
    np.testing.assert_array_equal(out[1:3], models[1:3])
    # seeded: the same iteration gives the same perturbation
    again = models.copy()
    emc.reseed(again, frames, 5)
    np.testing.assert_array_equal(again, out)
    # nothing starved, or reseeding off: nothing changes
    same = models.copy()
    assert emc.reseed(same, np.full(4, fair), 5) == 0
    emc.params.reseed_share = 0.0
    assert emc.reseed(same, frames, 5) == 0
    np.testing.assert_array_equal(same, models)


def test_reseeding_keeps_classes_alive_and_populations_apart(tiny_dataset, tmp_path):
    """Twelve classes for two populations: without re-seeding some starve; with it every class
    ends with frames, and the classes stay pure."""
    live = {}
    for share in (0.0, 0.25):
        out = tmp_path / f"rep_{share}.h5"
        run_emc(tiny_dataset, out, num_classes=12, iterations=20, reseed_share=share)
        with h5py.File(out) as f, h5py.File(tiny_dataset / "truth.h5") as t:
            occ, frames = f["occupancies"][:], f["frames"][:]
            labels = t["label"][:][frames]
        per_class = occ.sum(0)
        live[share] = int(np.sum(per_class >= 0.25 * occ.shape[0] / occ.shape[1]))
        classes = occ.argmax(1)
        majority = np.array([np.bincount(labels[classes == m], minlength=5).argmax()
                             if np.any(classes == m) else -1 for m in range(occ.shape[1])])
        assert np.mean(majority[classes] == labels) >= 0.95
    assert live[0.25] > live[0.0], live


def test_reseed_share_must_be_a_share():
    with pytest.raises(ConfigError, match="reseed_share"):
        EMCParams(reseed_share=1.0).check()
    with pytest.raises(ConfigError, match="reseed_share"):
        EMCParams(reseed_share=-0.1).check()


def run_models(dataset, photons=None, iterations=2, **overrides):
    """Models, occupancies and engine of a short run (no files written)."""
    params = EMCParams(**{"num_classes": 4, "num_rot": 12, "iterations": iterations, "seed": 2,
                          **overrides})
    emc = EMC2D([photons or dataset / "photons.h5"], dataset / "detector.h5", params)
    state = emc.initial_state()
    for _ in range(iterations):
        state, results = emc.iterate(state)
    return state.models, results["occupancies"], emc


def test_dense_csr_threaded_and_streamed_engines_agree(tiny_dataset, monkeypatch):
    # all pixels dense on one thread, all CSR on two, and the measured split with the frames
    # streamed from the file (no cache) and the views recomputed per block in pixel chunks (a
    # 2 MB budget): the same sums, so the same models to float32 rounding
    from spiscape.emc.frames import FrameStore

    big = {"num_classes": 40, "num_rot": 24}
    dense, occ_dense, emc = run_models(tiny_dataset, sparse_below=0, threads=1, **big)
    assert emc.num_dense == emc.merge_pix.size and emc.store.cached and emc.cache_views
    sparse, occ_sparse, emc = run_models(tiny_dataset, sparse_below=1, threads=2, **big)
    assert emc.num_dense == 0
    arrange = FrameStore.arrange
    monkeypatch.setattr(FrameStore, "arrange",
                        lambda self, *a, cache_bytes: arrange(self, *a, cache_bytes=0))
    streamed, occ_streamed, emc = run_models(tiny_dataset, memory_mb=2, threads=2, **big)
    assert not emc.store.cached and not emc.cache_views and len(emc.chunks) >= 2
    for models, occ in ((sparse, occ_sparse), (streamed, occ_streamed)):
        np.testing.assert_allclose(models, dense, rtol=2e-3, atol=1e-4 * dense.max())
        np.testing.assert_allclose(occ, occ_dense, atol=2e-3)


def with_frames_changed(dataset, path, change):
    from spiscape.io import SparsePhotons, read_photons, write_photons

    counts = read_photons(dataset / "photons.h5").to_dense()
    change(counts)
    write_photons(SparsePhotons.from_dense(counts), path)
    return path


def test_frames_without_photons_are_left_out_and_reported(tiny_dataset, tmp_path, caplog):
    def empty(counts):
        counts[[3, 10]] = 0

    photons = with_frames_changed(tiny_dataset, tmp_path / "p.h5", empty)
    out = tmp_path / "rep.h5"
    emc = EMC2D([photons], tiny_dataset / "detector.h5",
                EMCParams(num_classes=3, num_rot=6, iterations=2, seed=2))
    emc.run(out)
    assert "2 of 240 frames have no photon on a used pixel" in caplog.text
    with h5py.File(out) as f:
        assert 3 not in f["frames"][:] and 10 not in f["frames"][:]
        assert f["frames"].size == 238 and f["empty_frames"][:].tolist() == [3, 10]
        assert np.isfinite(f["intens"][:]).all() and np.isfinite(f["scale"][:]).all()
    nothing = with_frames_changed(tiny_dataset, tmp_path / "none.h5",
                                  lambda c: c.__setitem__(slice(None), 0))
    with pytest.raises(InputError, match="none of the 240 frames"):
        EMC2D([nothing], tiny_dataset / "detector.h5", EMCParams(num_classes=2, num_rot=4))


def test_resume_needs_the_same_photons(tiny_dataset, tmp_path):
    params = EMCParams(num_classes=3, num_rot=6, iterations=3, seed=2)
    emc = EMC2D([tiny_dataset / "photons.h5"], tiny_dataset / "detector.h5", params)
    state, _ = emc.iterate(emc.initial_state())
    ckpt = tmp_path / "rep.ckpt.h5"
    emc.save_checkpoint(ckpt, state)
    again = EMC2D([tiny_dataset / "photons.h5"], tiny_dataset / "detector.h5", params)
    assert again.load_checkpoint(ckpt).iteration == 1

    def move_one_photon(counts):  # same frames, same photon count, other data
        frame = int(np.flatnonzero(counts.sum(1))[0])
        pixel = int(np.flatnonzero(counts[frame])[0])
        counts[frame, pixel] -= 1
        counts[frame, (pixel + 1) % counts.shape[1]] += 1

    other = with_frames_changed(tiny_dataset, tmp_path / "other.h5", move_one_photon)
    emc = EMC2D([other], tiny_dataset / "detector.h5", params)
    with pytest.raises(InputError, match="other parameters or data"):
        emc.load_checkpoint(ckpt)


def test_output_is_checked_before_the_run(tiny_dataset, tmp_path, capsys):
    base = ["classify2d", "--photons", str(tiny_dataset / "photons.h5"),
            "--detector", str(tiny_dataset / "detector.h5"), "--num-classes", "2",
            "--num-rot", "4", "--iterations", "1000"]
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path / "adir", "is a directory"),
                         (tmp_path / "afile" / "rep.h5", "is a file, not a folder")):
        capsys.readouterr()
        assert cli.main([*base, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and str(out) in err[-1]


def test_resumed_auto_split_takes_the_checkpointed_crossover(tiny_dataset, tmp_path, monkeypatch):
    # the measured crossover is a timing: a resumed run must not measure another one and sum in
    # another order than the run it continues
    import spiscape.emc.run as emc_run

    params = EMCParams(num_classes=3, num_rot=6, iterations=2, seed=2, sparse_below="auto")
    monkeypatch.setattr(emc_run, "measure_crossover", lambda *a: 0.3)
    first = EMC2D([tiny_dataset / "photons.h5"], tiny_dataset / "detector.h5", params)
    state, _ = first.iterate(first.initial_state())
    ckpt = tmp_path / "rep.ckpt.h5"
    first.save_checkpoint(ckpt, state)
    monkeypatch.setattr(emc_run, "measure_crossover", lambda *a: 0.9)
    again = EMC2D([tiny_dataset / "photons.h5"], tiny_dataset / "detector.h5", params)
    assert again.crossover == 0.9
    again.run(tmp_path / "rep.h5", checkpoint=ckpt, resume=True)
    assert again.crossover == 0.3 and again.num_dense == first.num_dense
    with h5py.File(tmp_path / "rep.h5") as f:
        assert f.attrs["sparse_below"] == 0.3


def test_threaded_runs_repeat_to_the_last_bit(tiny_dataset):
    runs = [run_models(tiny_dataset, sparse_below=0.2, threads=2, block_frames=16)
            for _ in range(2)]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


def test_responsibilities_hold_no_subnormals():
    # late in the annealing most shifted log-probabilities are far below -87: their exp would be
    # float32 subnormals, which slow every later product; they must be exact zeros instead
    rng = np.random.default_rng(0)
    log_r = (rng.standard_normal((6, 40)) * 400).astype(np.float32)
    prob, logsum, _ = kernels.responsibilities(log_r.copy(), np.ones(6), np)
    tiny = np.finfo(np.float32).tiny
    assert not np.any((prob > 0) & (prob < tiny))
    assert (prob == 0).mean() > 0.5
    np.testing.assert_allclose(prob.sum(axis=1), 1, rtol=1e-6)
    shifted = log_r - log_r.max(axis=1, keepdims=True)
    expected = np.exp(shifted.astype(np.float64))
    np.testing.assert_allclose(prob, expected / expected.sum(1, keepdims=True), atol=1e-21)
    np.testing.assert_allclose(logsum, log_r.max(1) + np.log(expected.sum(1)), rtol=1e-6)
