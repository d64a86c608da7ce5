"""Multi-model 3D EMC (issue 19): the orientation sampling, the slice and its adjoint, symmetry,
and the science on tiny simulated data — two shapes told apart, cube orientations recovered
modulo m-3m — plus checkpoint / resume and the orient stage reading an emc3d model."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from spiscape import cli
from spiscape.emc3d import quaternions, slicing
from spiscape.io.emc3d import read_emc3d
from spiscape.orient import rotations


@pytest.mark.parametrize("num_div", [1, 2, 3, 4])
def test_refined_600_cell_has_10_5n3_plus_n_rotations_evenly_weighted(num_div):
    verts, edges, faces, cells = quaternions.cell600()
    assert (len(verts), len(edges), len(faces), len(cells)) == (120, 720, 1200, 600)
    quats, weights = quaternions.sample(num_div)
    assert len(quats) == quaternions.count(num_div) == 10 * (5 * num_div**3 + num_div)
    assert abs(weights.sum() - 1) < 1e-12 and weights.max() / weights.min() < 1.5
    # no rotation twice (q and -q are one), and neighbours about 54°/n apart
    dots = np.abs(quats @ quats.T)
    np.fill_diagonal(dots, 0)
    nearest = np.degrees(2 * np.arccos(np.clip(dots.max(axis=1), -1, 1)))
    assert nearest.min() > 0.5 * 54 / num_div and nearest.max() < 1.5 * 54 / num_div


def test_point_group_sampling_keeps_its_asymmetric_unit():
    full, _ = quaternions.sample(4)
    unit, weights = quaternions.sample(4, "432")
    assert len(full) / 24 <= len(unit) < 1.2 * len(full) / 24
    assert abs(weights.sum() - 1) < 1e-12
    assert np.all(rotations.in_asymmetric_unit(unit, rotations.point_group("432")))


@pytest.fixture(scope="module")
def geometry(tiny_dataset):
    from spiscape.io import read_detector

    det = read_detector(tiny_dataset / "detector.h5")
    q = np.stack([det.qx, det.qy, det.qz])[:, det.mask == 0]
    return q, slicing.grid_size(q)


def test_merge_is_the_adjoint_of_the_slice(geometry):
    q, size = geometry
    quats, _ = quaternions.sample(2)
    op = slicing.operator(quats[:50], q, size)
    rng = np.random.default_rng(0)
    models = rng.random((2, size**3))
    values = rng.random((q.shape[1], 50 * 2))
    lhs = np.sum(slicing.views(op, models, q.shape[1]) * values)
    rhs = np.sum(models * slicing.merge(op, values, 2))
    assert abs(lhs - rhs) < 1e-5 * abs(lhs)


def test_slices_read_the_model_at_the_rotated_pixels(geometry):
    """A linear ramp is read exactly by trilinear interpolation: M(x) = a . x + c at R q."""
    q, size = geometry
    axis = np.arange(size) - size // 2
    a = np.array([0.3, -0.2, 0.5])
    ramp = (a[0] * axis[:, None, None] + a[1] * axis[None, :, None]
            + a[2] * axis[None, None, :] + 100.0)
    quat = rotations.canonical(np.array([[0.8, 0.1, -0.5, 0.3]]))
    views = slicing.views(slicing.operator(quat, q, size), ramp[None], q.shape[1])[:, 0]
    expected = a @ (rotations.to_matrix(quat)[0] @ q) + 100.0
    np.testing.assert_allclose(views, expected, rtol=1e-5)


def test_symmetrize_makes_a_volume_invariant_under_the_group():
    rng = np.random.default_rng(1)
    vol = slicing.symmetrize(rng.random((1, 9, 9, 9)), "432")[0]
    for quat in rotations.point_group("432"):
        turned = slicing.rotate(vol, quat[None])  # (the faces may fall a hair outside: 0)
        np.testing.assert_allclose(turned[1:-1, 1:-1, 1:-1], vol[1:-1, 1:-1, 1:-1], atol=1e-9)
    np.testing.assert_allclose(vol, vol[::-1, ::-1, ::-1])  # Friedel


def _simulate(out, fractions, photons, frames, seed):
    from spiscape.simulate.run import SimulationParams, simulate_dataset

    simulate_dataset(SimulationParams(num_frames=frames, seed=seed, mean_photons=photons,
                                      binning=6, grid_size=48, fractions=fractions,
                                      chunk_frames=500, cube_edge_spread=0.0,
                                      sphere_diameter_spread=0.0), out)
    return out


def test_two_shapes_are_separated_from_the_landscapes_start(tiny_dataset, tmp_path):
    """Cubes and rods: the 2D route's landscape coordinates, grouped in two, seed the models
    (ARI ~0.8 on this set); the 3D EMC then tells the shapes apart (ARI >= 0.95)."""
    from spiscape.io.frames import read_landscape
    from spiscape.io.truth import read_truth
    from tests.test_place import build_reference

    landscape = build_reference(tiny_dataset / "photons.h5", tiny_dataset / "detector.h5",
                                tmp_path / "landscape")
    out = tmp_path / "emc3d.h5"
    assert cli.main(["emc3d", "--photons", str(tiny_dataset / "photons.h5"), "--detector",
                     str(tiny_dataset / "detector.h5"), "--out", str(out), "--num-models", "2",
                     "--num-div", "3", "--iterations", "20", "--seed", "1", "--init-labels",
                     str(landscape / "frames.h5"), "--init-by", "coordinates",
                     "--figure", str(tmp_path / "models.png"),
                     "--convergence", str(tmp_path / "convergence.png"), "--refine-cubic",
                     "--refine-num-div", "4", "--refine-iterations", "12"]) == 0
    result = read_emc3d(out)
    truth = np.asarray(read_truth(tiny_dataset / "truth.h5", volumes=False).label)
    seeded = read_landscape(landscape / "frames.h5")["clpca"]
    from spiscape.emc3d.run import landscape_groups

    start = adjusted_rand_score(truth, landscape_groups(seeded, 2, 1))
    ari = adjusted_rand_score(truth, result.frames["model"])
    assert ari >= 0.95 and ari > start, (start, ari)
    assert result.intens.shape[0] == 2 and np.all(result.intens >= 0)
    assert abs(result.occupancy.sum() - 1) < 1e-6
    assert (tmp_path / "models.png").stat().st_size > 1000
    assert (tmp_path / "convergence.png").stat().st_size > 1000
    # --refine-cubic: the cube's model alone is read as cubic, refined with m-3m on its frames
    # and kept in its place; the unrefined run is not left beside the output
    import json

    import h5py

    cube = int(np.bincount(result.frames["model"][truth == 0]).argmax())
    with h5py.File(out) as f:
        shares = f["anisotropic_share_m3m"][()]
        refined = json.loads(f.attrs["refined_m3m"])
    assert shares[cube] >= 0.5 > shares[1 - cube], shares
    assert list(refined) == [str(cube)]
    np.testing.assert_array_equal(result.intens[cube],
                                  read_emc3d(tmp_path / refined[str(cube)]).intens[0])
    assert not (tmp_path / "emc3d.unrefined.h5").exists()


def global_rotation_error(true_q, found_q, group):
    """Median misorientation (degrees, modulo the group and Friedel's in-plane flip) after the
    best global rotation G (the model's frame is the truth's turned by G)."""
    candidates = rotations.multiply(true_q[:100], rotations.conjugate(found_q[:100]))
    errors = [rotations.misorientation_deg(true_q, rotations.multiply(g, found_q), group,
                                           friedel=True) for g in candidates]
    return min(np.median(e) for e in errors)


def test_cube_orientations_are_recovered_modulo_m3m(tmp_path_factory):
    """High photon counts, one cube, the m-3m asymmetric unit at num_div 10 (4.7° between
    neighbours): the median orientation error is at most 5°."""
    from spiscape.io.truth import read_truth

    data = _simulate(tmp_path_factory.mktemp("cubes"), {"cube": 1.0}, 5000, 300, 5)
    out = data / "emc3d.h5"
    assert cli.main(["emc3d", "--photons", str(data / "photons.h5"), "--detector",
                     str(data / "detector.h5"), "--out", str(out), "--num-models", "1",
                     "--point-group", "m-3m", "--num-div", "10", "--iterations", "30",
                     "--seed", "1"]) == 0
    result = read_emc3d(out)
    truth = read_truth(data / "truth.h5", volumes=False)
    error = global_rotation_error(truth.quaternion, result.frames["quaternion"],
                                  rotations.point_group("432"))
    assert error <= 5.0, error
    # the model is the cube's intensity: log-intensity correlation with the truth's
    vol = np.asarray(read_truth(data / "truth.h5").volumes[0], dtype=np.float64)
    size = result.intens.shape[1]
    c, h = vol.shape[0] // 2, size // 2
    ref = vol[c - h:c + h + 1, c - h:c + h + 1, c - h:c + h + 1]
    axis = np.arange(size) - h
    r = np.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)
    inside = (r < h - 2) & (r > 2)
    model = result.intens[0]
    cc = np.corrcoef(np.log(model[inside] + 1e-9), np.log(ref[inside] + 1e-9))[0, 1]
    assert cc > 0.7, cc


def test_a_killed_run_resumes_to_the_same_result(tiny_dataset, tmp_path, monkeypatch):
    from spiscape.emc3d.run import EMC3D, EMC3DParams

    data = [tiny_dataset / "photons.h5"]
    det = tiny_dataset / "detector.h5"
    params = dict(num_models=2, num_div=2, iterations=6, seed=3)
    EMC3D(data, det, EMC3DParams(**params)).run(tmp_path / "straight.h5")
    original = EMC3D.iterate
    calls = {"n": 0}

    def dying(self, state, collect=False):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, state, collect)

    monkeypatch.setattr(EMC3D, "iterate", dying)
    with pytest.raises(KeyboardInterrupt):
        EMC3D(data, det, EMC3DParams(**params)).run(tmp_path / "killed.h5")
    assert not (tmp_path / "killed.h5").exists()
    assert (tmp_path / "killed.ckpt.h5").exists()
    monkeypatch.setattr(EMC3D, "iterate", original)
    EMC3D(data, det, EMC3DParams(**params)).run(tmp_path / "killed.h5", resume=True)
    a, b = read_emc3d(tmp_path / "straight.h5"), read_emc3d(tmp_path / "killed.h5")
    np.testing.assert_allclose(a.intens, b.intens, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(a.frames["model"], b.frames["model"])
    # another setting refuses the checkpoint
    EMC3D(data, det, EMC3DParams(**params)).save_checkpoint(
        tmp_path / "other.ckpt.h5", EMC3D(data, det, EMC3DParams(**params)).initial_state())
    from spiscape.errors import InputError

    with pytest.raises(InputError, match="other parameters"):
        EMC3D(data, det, EMC3DParams(**{**params, "seed": 4})).load_checkpoint(
            tmp_path / "other.ckpt.h5")


def test_orient_takes_an_emc3d_model_and_refuses_an_unnamed_one(tmp_path, capsys):
    import h5py

    from spiscape.orient.slices import read_reference_volume

    path = tmp_path / "emc3d.h5"
    with h5py.File(path, "w") as f:
        f["intens"] = np.ones((2, 5, 5, 5))
        f.attrs["q_per_voxel_inv_nm"] = 0.01
    ref = read_reference_volume(path, 0.01, model=1)
    assert ref.intens.shape == (5, 5, 5)
    from spiscape.errors import InputError

    with pytest.raises(InputError, match="holds 2 models"):
        read_reference_volume(path, 0.01)


def test_impossible_settings_are_refused(tiny_dataset, tmp_path, capsys):
    base = ["emc3d", "--photons", str(tiny_dataset / "photons.h5"), "--detector",
            str(tiny_dataset / "detector.h5"), "--out", str(tmp_path / "e.h5")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main([*base, "--point-group", "m3m"])
    assert exit_.value.code == 2 and "m3m" in capsys.readouterr().err
    assert cli.main([*base, "--point-group", "m-3m", "--iterations", "5", "--warmup",
                     "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warmup" in err
    assert not (tmp_path / "e.h5").exists()


def test_from_model_refines_one_models_frames_alone(tiny_dataset, tmp_path):
    base = ["emc3d", "--photons", str(tiny_dataset / "photons.h5"), "--detector",
            str(tiny_dataset / "detector.h5"), "--num-div", "1", "--iterations", "3"]
    first = tmp_path / "first.h5"
    assert cli.main([*base, "--out", str(first), "--num-models", "2"]) == 0
    chosen = read_emc3d(first, volumes=False).frames["model"] == 1
    second = tmp_path / "second.h5"
    assert cli.main([*base, "--out", str(second), "--num-models", "1", "--from-model",
                     str(first), "1"]) == 0
    models = read_emc3d(second, volumes=False).frames["model"]
    np.testing.assert_array_equal(models >= 0, chosen)  # the others are left out (-1)


def test_held_out_frames_are_left_out_and_scored(tiny_dataset, tmp_path):
    """--held-out: a seeded share of the frames is not fitted (model −1 in the output) and is
    scored under the mixture; the score ignores the models' overall scale (each view's scale is
    fitted) and rises from the isotropic start to the fitted models."""
    from spiscape.emc3d.run import EMC3D, EMC3DParams

    photons, det = tiny_dataset / "photons.h5", tiny_dataset / "detector.h5"
    emc = EMC3D([photons], det, EMC3DParams(num_models=2, num_div=2, iterations=8,
                                            held_out=0.25, seed=1))
    assert 0.15 < emc.held.shape[0] / (emc.held.shape[0] + emc.counts.shape[0]) < 0.35
    start = emc.initial_state()
    occupancy = np.full(2, 0.5)
    ll0 = emc.held_out_loglik(start.models, occupancy)
    np.testing.assert_allclose(emc.held_out_loglik(3.0 * start.models, occupancy), ll0,
                               rtol=1e-4)
    out = tmp_path / "emc3d.h5"
    frames = emc.run(out)
    result = read_emc3d(out, volumes=False)
    assert result.attrs["held_out_frames"] == emc.held.shape[0]
    assert int((frames["model"] < 0).sum()) >= emc.held.shape[0]
    fitted = read_emc3d(out)
    ll = emc.held_out_loglik(fitted.intens, fitted.occupancy)
    assert ll.mean() > ll0.mean() + 1.0
    np.testing.assert_allclose(result.attrs["held_out_loglik_per_frame"], ll.mean(), rtol=1e-5)


def test_start_models_from_a_file_replace_the_powder(tiny_dataset, tmp_path, capsys):
    """--start-models: an earlier run's models are the start (K from the file), and a file on
    another grid is refused with one line naming it."""
    import h5py

    from spiscape.emc3d.run import EMC3D, EMC3DParams

    base = ["emc3d", "--photons", str(tiny_dataset / "photons.h5"), "--detector",
            str(tiny_dataset / "detector.h5"), "--num-div", "1"]
    first = tmp_path / "first.h5"
    assert cli.main([*base, "--out", str(first), "--num-models", "3", "--iterations", "3"]) == 0
    fitted = read_emc3d(first)
    emc = EMC3D([tiny_dataset / "photons.h5"], tiny_dataset / "detector.h5",
                EMC3DParams(num_models=3, num_div=1, iterations=1), start=first)
    np.testing.assert_array_equal(emc.initial_state().models, fitted.intens)
    second = tmp_path / "second.h5"
    assert cli.main([*base, "--out", str(second), "--iterations", "1", "--start-models",
                     str(first)]) == 0
    assert read_emc3d(second).intens.shape == fitted.intens.shape  # K = 3 from the file
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f["intens"] = np.ones((3, 7, 7, 7))
    capsys.readouterr()
    assert cli.main([*base, "--out", str(tmp_path / "third.h5"), "--iterations", "1",
                     "--start-models", str(wrong)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wrong.h5" in err and "shape" in err
    assert not (tmp_path / "third.h5").exists()


def test_the_cpu_budget_defaults_to_4_gib_or_a_quarter_of_the_memory(tiny_dataset):
    import os

    from spiscape.emc3d.run import EMC3D, EMC3DParams, cpu_budget_mb

    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    assert cpu_budget_mb() == int(max(256, min(4096, total_mb / 4)))
    emc = EMC3D([tiny_dataset / "photons.h5"], tiny_dataset / "detector.h5",
                EMC3DParams(num_models=1, num_div=1, iterations=1, device="cpu"))
    assert emc.budget == cpu_budget_mb() * 2**20
    given = EMC3D([tiny_dataset / "photons.h5"], tiny_dataset / "detector.h5",
                  EMC3DParams(num_models=1, num_div=1, iterations=1, device="cpu", memory_mb=300))
    assert given.budget == 300 * 2**20


def test_beta_starts_alike_for_every_frame_at_one_over_root_mean_count(tiny_dataset):
    """The 3D default: one β for all frames, 1/sqrt(mean photons of the frames used); 'auto'
    keeps the per-frame 1/sqrt(N_d)."""
    from spiscape.emc3d.run import EMC3D, EMC3DParams

    emc = EMC3D([tiny_dataset / "photons.h5"], tiny_dataset / "detector.h5",
                EMC3DParams(num_models=1, num_div=1, iterations=1, device="cpu"))
    assert emc.beta_start == pytest.approx(emc.frame_photons.mean() ** -0.5)
    assert np.ptp(emc.frame_photons) > 0  # the frames' counts differ, their β does not
    per_frame = EMC3D([tiny_dataset / "photons.h5"], tiny_dataset / "detector.h5",
                      EMC3DParams(num_models=1, num_div=1, iterations=1, device="cpu",
                                  beta_start="auto"))
    assert per_frame.beta_start == "auto"


def _direct_m_step(emc, models, scale, beta, merge):
    """One EM step written out densely: views W_tj = c_t M_k(R_o q_t) (floored as the kernel
    floors them), P_dj ∝ w_o exp(β (R_dj − max)), then either every photon merged alike
    (photons) or each reached view's tomogram Σ_d P_dj K_dt / (c_t Σ_d P_dj φ_d) merged with
    the interpolation weights as its weight (tomograms)."""
    from spiscape.emc import kernels
    from spiscape.emc3d.run import TOMOGRAM_REACH

    k = len(models)
    op = slicing.operator(emc.quats, emc.q, emc.size).astype(np.float64)
    w = slicing.views(op, models.reshape(k, -1), emc.used.size) * emc.corr[:, None]
    w = np.maximum(w, kernels.LOG_FLOOR * w.mean() + np.finfo(np.float32).tiny)
    counts = emc.counts.toarray().astype(np.float64)
    log_r = (counts @ np.log(w) - scale[:, None] * w.sum(axis=0)[None, :]
             + np.repeat(np.log(emc.weights), k)[None, :])
    shifted = beta * (log_r - log_r.max(axis=1, keepdims=True))
    prob = np.where(shifted > kernels.LOG_PROB_CUT, np.exp(shifted), 0.0)
    prob /= prob.sum(axis=1, keepdims=True)
    num, den = counts.T @ prob, scale @ prob  # (P, J), (J,)
    if merge == "photons":
        top = slicing.merge(op, num, k)
        bottom = slicing.merge(op, emc.corr[:, None] * den[None, :], k)
    else:
        reached = (prob >= np.exp(-TOMOGRAM_REACH) * prob.max(axis=1, keepdims=True)).any(0)
        live = (reached & (den > 0)).astype(np.float64)
        top = slicing.merge(op, num * (live / np.where(den > 0, den, 1))[None, :]
                            / emc.corr[:, None], k)
        bottom = slicing.merge(op, np.broadcast_to(live, num.shape), k)
    shape = models.shape
    top = slicing.symmetrize(top.reshape(shape), "1")
    bottom = slicing.symmetrize(bottom.reshape(shape), "1")
    reached = bottom > 1e-12 * bottom.max()
    return np.where(reached, top / np.where(reached, bottom, 1), models)


@pytest.mark.parametrize("merge", ["tomograms", "photons"])
def test_an_iteration_is_the_written_out_em_step_in_any_frame_blocks(tiny_dataset, merge):
    """Both M-steps against a dense reference on the tiny data (K 2, num_div 1, β 0.3), with
    all frames in one block and in blocks of 7 (the tomograms are summed over blocks before
    they are divided)."""
    from spiscape.emc3d.run import EMC3D, EMC3DParams

    results = []
    for block in (None, 7):
        emc = EMC3D([tiny_dataset / "photons.h5"], tiny_dataset / "detector.h5",
                    EMC3DParams(num_models=2, num_div=1, iterations=1, beta_start=0.3,
                                merge=merge, block_frames=block, device="cpu", seed=2))
        state = emc.initial_state()
        new, _ = emc.iterate(state)
        results.append(new.models)
    expected = _direct_m_step(emc, state.models, state.scale, 0.3, merge)
    for models in results:
        np.testing.assert_allclose(models, expected, rtol=2e-3, atol=1e-5 * expected.max())
    other = _direct_m_step(emc, state.models, state.scale, 0.3,
                           "photons" if merge == "tomograms" else "tomograms")
    assert np.abs(other - expected).max() > 0.05 * expected.max()  # the two rules differ


@pytest.mark.mpi
def test_two_ranks_merge_the_same_tomograms_as_one(tiny_dataset, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import venv_executable

    base = [sys.executable, "-m", "spiscape", "emc3d", "--photons",
            str(tiny_dataset / "photons.h5"), "--detector", str(tiny_dataset / "detector.h5"),
            "--num-models", "2", "--num-div", "1", "--iterations", "3", "--device", "cpu"]
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    outs = []
    for launcher in ((), (venv_executable("mpiexec"), "--oversubscribe", "-n", "2")):
        out = tmp_path / f"ranks{len(launcher)}.h5"
        proc = subprocess.run([*launcher, *base, "--out", str(out)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outs.append(read_emc3d(out))
    one, two = outs
    np.testing.assert_allclose(two.intens, one.intens, rtol=1e-3, atol=1e-6 * one.intens.max())
    np.testing.assert_array_equal(two.frames["model"], one.frames["model"])


def test_m3m_explains_a_cubes_anisotropy_and_not_a_rods(tiny_dataset):
    """The share of a model's anisotropic log-intensity power that m-3m keeps (at its best
    rotation): high for the true cube turned anywhere, low for the rod (--refine-cubic reads a
    model as cubic from 0.5)."""
    from spiscape.emc3d.run import CUBIC_SHARE
    from spiscape.io.truth import read_truth

    truth = read_truth(tiny_dataset / "truth.h5")
    names = truth.label_names
    volumes = {names[int(lab)]: np.asarray(v, dtype=np.float64)
               for lab, v in zip(truth.volume_info["label"], truth.volumes, strict=True)}
    size = volumes["cube"].shape[0]
    band = (2.0, 0.7 * (size // 2 - 1))
    turned = slicing.rotate(volumes["cube"], np.array([[0.9, 0.2, 0.3, 0.25]]) / np.linalg.norm(
        [0.9, 0.2, 0.3, 0.25]))
    cube = slicing.anisotropic_share(turned, "m-3m", band)
    rod = slicing.anisotropic_share(volumes["rod"], "m-3m", band)
    assert cube >= 0.8 and rod < CUBIC_SHARE, (cube, rod)
