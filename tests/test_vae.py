"""The VAE stage: symmetry, Ewald slicing, loss, checkpoint/resume, per-frame latents, CLI."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from spiscape.simulate.frames import quaternion_to_matrix as np_quat_to_matrix
from spiscape.simulate.frames import random_quaternions, slice_volume
from spiscape.simulate.intensity import cube_form_factor, sphere_form_factor
from spiscape.vae import model as vm
from spiscape.vae.analysis import frame_latents, latent_points
from spiscape.vae.data import synthetic_averages, write_synthetic
from spiscape.vae.train import TrainConfig, setup_distributed, train

torch.set_num_threads(1)  # tiny models: one thread avoids OpenMP spin on a busy box
V = 15
S = 13
DETD = EWALD = 60.0


def analytic_volumes(n: int = V) -> np.ndarray:
    """Cube and sphere intensities (2, n, n, n), centred at n // 2, |F|^2 of unit-volume shapes
    about 4 voxels across in real space (form factors from spiscape.simulate.intensity)."""
    ax = (np.arange(n) - n // 2) / n
    q = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1)
    cube = cube_form_factor(q, 4.0) ** 2
    sphere = sphere_form_factor(np.linalg.norm(q, axis=-1), 2.5) ** 2
    return np.stack([cube, sphere]) * 1e3 + 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    vols = analytic_volumes()
    sim = synthetic_averages(vols, S, DETD, EWALD, 24, np.random.default_rng(3), photons=200.0,
                             beamstop=1.0)
    write_synthetic(sim, out / "averages.h5", out / "orientation.h5",
                    {"truth_t": sim["shape_index"].astype(float),
                     "truth_label": np.where(sim["shape_index"] == 0, 0, 2)})
    with h5py.File(out / "detector.h5", "w") as f:
        ax = np.arange(S) - (S - 1) / 2
        cx, cy = np.meshgrid(ax, ax, indexing="ij")
        q = vm.ewald_grid(S, DETD, EWALD).reshape(3, -1)
        for k, name in enumerate(("qx", "qy", "qz")):
            f[name] = q[k]
        f["corr"] = np.ones(S * S)
        f["mask"] = np.zeros(S * S, dtype=np.uint8)
        f["detd"] = DETD
        f["ewald_rad"] = EWALD
    return out, sim


def small_cfg(**kw):
    base = dict(zdim=1, volume_size=V, epochs=3, batch_size=8, lr=3e-3, kl_weight=0.01, seed=7,
                device="cpu", check_every=1, enc_channels=4, dec_channels=8, hidden=32,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def training_inputs(sim, cfg):
    from spiscape.vae.data import VAEData, loss_weight, radial_profile, tensors

    n = sim["intens"].shape[0]
    data = VAEData(intens=sim["intens"], support=sim["support"], quaternion=sim["quaternion"],
                   gain=sim["gain"], replicate=sim["replicate"], klass=sim["class"],
                   frames=sim["frames"], selected=np.ones(n, bool))
    q = vm.ewald_grid(S, DETD, EWALD)
    qn = np.linalg.norm(q, axis=0)
    prof = radial_profile(data.intens, data.support, qn, nbins=cfg.volume_size + 2)
    return tensors(data, q, prof), loss_weight(data.support, qn, cfg.volume_size), q, prof


# --------------------------------------------------------------------------- symmetry
def test_m3m_symmetrisation_idempotent_and_invariant():
    ops = vm.group_operations("m-3m")
    assert len(ops) == 48 and len(set(ops)) == 48
    v = torch.randn(2, 9, 9, 9, dtype=torch.float64)
    s = vm.symmetrise(v, "m-3m")
    assert torch.allclose(vm.symmetrise(s, "m-3m"), s, atol=1e-12)
    for perm, flips in ops:
        assert torch.allclose(vm.apply_operation(s, perm, flips), s, atol=1e-12)
    brute = sum(vm.apply_operation(v, p, f) for p, f in ops) / 48
    assert torch.allclose(brute, s, atol=1e-12)
    # a non-symmetric volume is changed; point group 1 leaves it alone
    assert not torch.allclose(s, v)
    assert vm.symmetrise(v, "1") is v


def test_model_volumes_are_m3m_symmetric():
    q = vm.ewald_grid(S, DETD, EWALD)
    model = vm.SPIVAE(1, V, S, q, np.zeros(V + 2), "m-3m", 4, 8, 16)
    with torch.no_grad():
        vols = model.volumes(torch.tensor([[0.3], [-1.0]]))
    assert vols.shape == (2, V, V, V) and bool((vols > 0).all())
    for perm, flips in vm.group_operations("m-3m"):
        assert torch.allclose(vm.apply_operation(vols, perm, flips), vols, rtol=1e-5)


# --------------------------------------------------------------------------- slicing
def test_slicing_matches_simulator_convention():
    rng = np.random.default_rng(0)
    ax = np.arange(V) - V // 2
    # an analytic, asymmetric volume: orientation errors would show
    vol = np.exp(-((ax[:, None, None] - 1.5) ** 2 / 9 + ax[None, :, None] ** 2 / 4
                   + (ax[None, None, :] + 2) ** 2 / 16))
    q = vm.ewald_grid(S, DETD, EWALD).reshape(3, -1)
    quats = random_quaternions(4, rng)
    expected = slice_volume(vol, q, np_quat_to_matrix(quats))
    rot = vm.quaternion_to_matrix(torch.tensor(quats))
    assert np.allclose(rot.numpy(), np_quat_to_matrix(quats), atol=1e-12)
    got = vm.slice_volumes(torch.tensor(vol).expand(4, V, V, V), torch.tensor(q), rot)
    # within the volume (the loss uses only |q| <= V // 2 - 1; at the very edge scipy reads the
    # constant 0 where grid_sample blends with the zero padding)
    inside = np.linalg.norm(q, axis=0) <= V // 2 - 1
    assert inside.sum() > 100
    assert np.allclose(got.numpy()[:, inside], expected[:, inside], atol=1e-10)
    # the octant read at |R q| equals the full symmetric volume (the m-3m fast path)
    sym = vm.symmetrise(torch.tensor(vol)[None], "m-3m")
    full = vm.slice_volumes(sym.expand(4, V, V, V), torch.tensor(q), rot)
    octant = sym[:, V // 2:, V // 2:, V // 2:].expand(4, -1, -1, -1)
    folded = vm.slice_volumes(octant, torch.tensor(q), rot, folded=True)
    assert np.allclose(full.numpy(), folded.numpy(), atol=1e-10)


def test_ewald_grid_matches_detector_formula():
    q = vm.ewald_grid(5, 100.0, 80.0)
    c = 2.0
    fac = np.sqrt(2.0**2 + 1.0**2 + 100.0**2)  # grid point (4, 1): cx = 2, cy = -1
    assert np.allclose(q[:, 4, 1], [2 * 80 / fac, -80 / fac, 80 * (100 / fac - 1)])
    assert np.allclose(q[:, int(c), int(c)], 0.0)


# --------------------------------------------------------------------------- training
def test_loss_decreases(tiny, tmp_path):
    _, sim = tiny
    cfg = small_cfg(epochs=6, check_every=3, lr=1e-2)
    tens, weight, q, prof = training_inputs(sim, cfg)
    _, result = train(cfg, tens, weight, q, prof, tmp_path, ctx=setup_distributed("cpu"))
    loss = result["history"]["loss"]
    assert len(loss) == 6 and np.all(np.isfinite(loss))
    assert loss[-1] < 0.8 * loss[0]
    conv = result["convergence"]
    assert conv["epoch"] == [3, 6] and np.isfinite(conv["volume_cc"][1])


@pytest.mark.parametrize("refine", [False, True])
def test_resume_continues_to_same_result(tiny, tmp_path, refine):
    _, sim = tiny
    cfg = small_cfg(epochs=3, refine_poses=refine, pose_start=0)
    tens, weight, q, prof = training_inputs(sim, cfg)
    ctx = setup_distributed("cpu")
    full, res_full = train(cfg, tens, weight, q, prof, tmp_path / "a", ctx=ctx)
    train(cfg, tens, weight, q, prof, tmp_path / "b", ctx=ctx, stop_after=1)
    ck = torch.load(tmp_path / "b/checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 1 and {"model", "optimiser", "rng", "history"} <= set(ck)
    resumed, res_resumed = train(cfg, tens, weight, q, prof, tmp_path / "b", resume=True,
                                 ctx=ctx)
    assert res_resumed["history"]["epoch"] == [1.0, 2.0, 3.0]
    assert np.allclose(res_full["history"]["loss"], res_resumed["history"]["loss"], rtol=1e-6)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(),
                                 strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
    if refine:  # the pose corrections and their optimiser resume too
        assert np.abs(res_full["pose_delta"]).max() > 0
        np.testing.assert_allclose(res_full["pose_delta"], res_resumed["pose_delta"], rtol=1e-5,
                                   atol=1e-8)


def test_resume_starts_afresh_after_a_change_of_settings_or_data(tiny, tmp_path, caplog):
    _, sim = tiny
    cfg = small_cfg(epochs=2, check_every=0)
    tens, weight, q, prof = training_inputs(sim, cfg)
    ctx = setup_distributed("cpu")
    out = tmp_path / "v"
    train(cfg, tens, weight, q, prof, out, ctx=ctx)
    # more epochs of the same training: resumed
    _, more = train(small_cfg(epochs=3, check_every=0), tens, weight, q, prof, out,
                    resume=True, ctx=ctx)
    assert more["history"]["epoch"] == [1.0, 2.0, 3.0]
    assert not (out / "checkpoint.stale.pt").exists()
    # another KL weight: the finished checkpoint is not taken for this training
    with caplog.at_level("WARNING"):
        _, other = train(small_cfg(epochs=3, check_every=0, kl_weight=0.5), tens, weight, q,
                         prof, out, resume=True, ctx=ctx)
    assert other["history"]["epoch"] == [1.0, 2.0, 3.0]
    assert other["history"]["loss"][0] != more["history"]["loss"][0]
    assert (out / "checkpoint.stale.pt").exists()
    assert "kl_weight 0.01 -> 0.5" in caplog.text
    # the same settings on other averages: afresh too
    changed = {**tens, "image": tens["image"] * 1.5}
    caplog.clear()
    with caplog.at_level("WARNING"):
        _, again = train(small_cfg(epochs=3, check_every=0, kl_weight=0.5), changed, weight, q,
                         prof, out, resume=True, ctx=ctx)
    assert again["history"]["epoch"] == [1.0, 2.0, 3.0] and "data" in caplog.text


# --------------------------------------------------------------------------- analysis
def test_frame_latents_weighting(tmp_path):
    # replicate 0: frames 0, 1, 2 over classes 0, 1; replicate 1: frames 1, 3 over classes 0, 1
    with h5py.File(tmp_path / "rep0.h5", "w") as f:
        f["frames"] = np.array([0, 1, 2])
        f["occupancies"] = np.array([[1.0, 0.0], [0.25, 0.75], [0.0, 0.0]])
    with h5py.File(tmp_path / "rep1.h5", "w") as f:
        f["frames"] = np.array([1, 3])
        f["occupancies"] = np.array([[0.5, 0.5], [0.2, 0.8]])
    # averages: (rep 0, class 0) mu 0, (rep 0, class 1) mu 4, (rep 1, class 0) mu 2; rep 1's
    # class 1 is not an average (dropped), so its weight is renormalised onto class 0
    mu = np.array([[0.0], [4.0], [2.0]])
    lat = frame_latents([tmp_path / "rep0.h5", tmp_path / "rep1.h5"], np.array([0, 0, 1]),
                        np.array([0, 1, 0]), mu, 5)
    assert lat.shape == (5, 1)
    assert lat[0, 0] == pytest.approx(0.0)
    assert lat[1, 0] == pytest.approx(0.5 * (0.25 * 0 + 0.75 * 4) + 0.5 * 2.0)
    assert np.isnan(lat[2, 0])  # zero occupancy: never assigned
    assert lat[3, 0] == pytest.approx(2.0)
    assert np.isnan(lat[4, 0])


def test_latent_points_grid_marks_empty_cells():
    mu = np.array([[0.0, 0.0], [0.1, 0.0], [1.0, 1.0]])
    z, has = latent_points(mu, 9)
    assert z.shape == (9, 2) and has[0] and has[-1] and not has.all()
    z1, has1 = latent_points(mu[:, :1], 5)
    assert z1[0, 0] == 0.0 and z1[-1, 0] == 1.0
    assert has1.tolist() == [True, True, False, True, True]  # 0.5 is 0.4 from any mu


def test_shell_correlation_identity_and_rotation():
    from spiscape.metrics.volumes import best_rotation_shell_correlation, shell_correlation

    vols = analytic_volumes(17)
    q, cc = shell_correlation(vols[0], vols[0] * 3.0)
    assert np.nanmin(cc[1:]) > 0.999
    rotated = np.transpose(vols[0] * (1 + np.arange(17))[:, None, None], (1, 0, 2))
    res = best_rotation_shell_correlation(rotated, vols[0] * (1 + np.arange(17))[:, None, None],
                                          qmin=1.0)
    assert res["min"] > 0.999


# --------------------------------------------------------------------------- CLI
def test_cli_runs_and_rejects_mismatched_orientation(tiny, tmp_path, capsys):
    from spiscape.cli import main

    out, sim = tiny
    args = ["vae", "--averages", str(out / "averages.h5"), "--detector",
            str(out / "detector.h5"), "--epochs", "1", "--volume-size", str(V),
            "--batch-size", "8", "--dec-channels", "8", "--enc-channels", "4",
            "--num-volumes", "3", "--device", "cpu"]
    bad = tmp_path / "orientation_bad.h5"
    with h5py.File(bad, "w") as f:
        f["quaternion"] = sim["quaternion"][:-1]
        f["gain"] = sim["gain"][:-1]
    rc = main(args + ["--orientation", str(bad), "--out-dir", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "orientation_bad.h5" in err[0] and "23" in err[0]
    rc = main(args + ["--orientation", str(out / "orientation.h5"), "--out-dir",
                      str(tmp_path / "vae"), "--no-figures", "--volume-size", "14"])
    assert rc == 2  # even V
    with pytest.raises(SystemExit):  # out of range: stops while the arguments are parsed
        main(args + ["--orientation", str(out / "orientation.h5"), "--out-dir",
                     str(tmp_path / "p"), "--refine-poses", "--pose-lr", "0"])
    assert main(args + ["--orientation", str(out / "orientation.h5"), "--out-dir",
                        str(tmp_path / "m"), "--emc-merge"]) == 2  # needs --replicates
    assert main(args + ["--orientation", str(out / "orientation.h5"), "--out-dir",
                        str(tmp_path / "f"), "--frame-latent", "posterior"]) == 2  # --photons
    capsys.readouterr()
    assert main(args + ["--orientation", str(out / "orientation.h5"), "--out-dir",
                        str(tmp_path / "v"), "--volumes-from", "frames"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--volumes-from frames needs" in err[0]
    assert not (tmp_path / "v/volumes.h5").exists()
    with pytest.raises(SystemExit):  # one size step is no range: refused while parsing
        main(args + ["--orientation", str(out / "orientation.h5"), "--out-dir",
                     str(tmp_path / "z"), "--frame-size-steps", "1"])
    assert "--frame-size-steps" in capsys.readouterr().err
    for extra in ([], ["--commonlines", str(out / "averages.h5")]):  # each needs the other
        assert main(args + ["--orientation", str(out / "orientation.h5"), "--out-dir",
                            str(tmp_path / "s"), "--size-correction", "commonlines",
                            *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--commonlines" in err[0] and "--embedding" in err[1]
    rc = main(args + ["--orientation", str(out / "orientation.h5"),
                      "--out-dir", str(tmp_path / "vae"), "--no-figures", "--refine-poses",
                      "--pose-start", "0"])
    assert rc == 0
    with h5py.File(tmp_path / "vae/volumes.h5") as f:
        assert f["intens"].shape == (3, V, V, V) and f["z"].shape == (3, 1)
        assert f["has_data"][()].all()
    with h5py.File(tmp_path / "vae/latent.h5") as f:
        assert f["mu"].shape == (24, 1) and f["logvar"].shape == (24, 1)
        refined, change = f["quaternion_refined"][()], f["pose_change_deg"][()]
    assert refined.shape == (24, 4) and np.allclose(np.linalg.norm(refined, axis=1), 1)
    from spiscape.orient.rotations import misorientation_deg, point_group
    turned = misorientation_deg(refined, sim["quaternion"], point_group("m-3m"))
    assert np.all(change > 0) and np.all(turned <= change + 1e-6)  # one epoch: small steps
    assert len(list((tmp_path / "vae/volumes").glob("*.mrc"))) == 3
    assert (tmp_path / "vae/model.pt").exists() and (tmp_path / "vae/checkpoint.pt").exists()


def test_pose_refinement_recovers_perturbed_orientations(tmp_path):
    """Cube averages whose orientations are 6 degrees off (random axes): the refined poses are
    within half of that of the truth, modulo the cube's 48 symmetries."""
    from spiscape.orient.rotations import from_rotvec, misorientation_deg, multiply, point_group
    from spiscape.vae.data import VAEData, loss_weight, radial_profile, tensors
    from spiscape.vae.scoring import refined_poses

    n, size, detd = 21, 19, 90.0
    cube = analytic_volumes(n)[:1]
    sim = synthetic_averages(cube, size, detd, detd, 32, np.random.default_rng(5),
                             photons=3000.0, beamstop=1.5)
    rng = np.random.default_rng(6)
    axes = rng.normal(size=(32, 3))
    axes *= np.radians(6.0) / np.linalg.norm(axes, axis=1, keepdims=True)
    off = multiply(sim["quaternion"], from_rotvec(axes))
    data = VAEData(intens=sim["intens"], support=sim["support"], quaternion=off,
                   gain=sim["gain"], replicate=sim["replicate"], klass=sim["class"],
                   frames=sim["frames"], selected=np.ones(32, bool))
    q = vm.ewald_grid(size, detd, detd)
    qn = np.linalg.norm(q, axis=0)
    prof = radial_profile(data.intens, data.support, qn, nbins=n + 2)
    cfg = small_cfg(volume_size=n, epochs=30, lr=3e-3, check_every=0, refine_poses=True,
                    pose_lr=3e-3, pose_start=5, radial_weighting=0.0)
    _, result = train(cfg, tensors(data, q, prof), loss_weight(data.support, qn, n), q, prof,
                      tmp_path)
    poses = refined_poses(off, data.selected, result["pose_delta"], "m-3m")
    group = point_group("m-3m")
    before = np.median(misorientation_deg(off, sim["quaternion"], group))
    after = np.median(misorientation_deg(poses["quaternion_refined"], sim["quaternion"], group))
    assert before == pytest.approx(6.0, abs=0.01)
    assert after < 3.0, (before, after)


# --------------------------------------------------------------------------- selection, weights
def test_auto_clusters_drop_near_empty_clusters_and_outliers():
    from spiscape.errors import ConfigError
    from spiscape.vae.data import auto_clusters

    labels = np.array([0, 0, 1, 1, 2, 3, -1])
    frames = np.array([40.0, 40.0, 30.0, 40.0, 10.0, 9.0, 50.0])
    assert auto_clusters(labels, frames, 0.15) == [0, 1]
    assert auto_clusters(labels, np.zeros(7), 0.2) == [0, 1]  # no counts: averages count
    with pytest.raises(ConfigError):
        auto_clusters(labels, frames, 0.9)


def series_landscape(seed=3, beside=(3.0, 2.5, 0.0)):
    """A structural series (60 averages on a curve from a cube end to a sphere end, cut by
    k-means into 4 clusters of 15; the ends hold most frames) and a contaminant species (10
    averages) centred at ``beside``: by default beside the middle of the series, nearer to it
    than the series is long."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, 6, 60))
    series = np.stack([t, np.sin(t), 0.05 * rng.standard_normal(60)], axis=1)
    contaminant = np.asarray(beside) + 0.1 * rng.standard_normal((10, 3))
    coords = np.concatenate([series, contaminant])
    labels = np.concatenate([np.repeat([0, 1, 2, 3], 15), np.full(10, 4)])
    frames = np.concatenate([np.full(15, 100.0), np.full(30, 20.0), np.full(15, 80.0),
                             np.full(10, 50.0)])
    return coords, labels, frames


def test_auto_clusters_keep_the_series_and_leave_out_a_species_beside_it():
    from spiscape.vae.data import auto_clusters, main_axis

    for beside in ((3.0, 2.5, 0.0), (3.0, 8.0, 0.0), (0.5, -2.0, 1.0)):
        coords, labels, frames = series_landscape(beside=beside)
        assert auto_clusters(labels, frames, 0.01, coords) == [0, 1, 2, 3], beside
    # the old size rule (clusters of >= 15 % of the frames) kept the ends alone
    assert auto_clusters(labels, frames, 0.15) == [0, 3]
    # two clusters are an axis of their own; a detour allowance of 1 keeps the ends alone
    assert main_axis(coords[labels < 2], labels[labels < 2], frames[labels < 2], 1.25) == [0, 1]
    assert auto_clusters(labels, frames, 0.01, coords, max_detour=1.0) == [0, 3]


def test_auto_clusters_known_limit_a_species_heavier_than_an_end():
    """The ends are the two clusters holding the most frames: a species that outweighs the
    series' sphere end becomes an end itself (docs/validation.md, "Size spread, noise level and
    the VAE's clusters")."""
    from spiscape.vae.data import auto_clusters

    coords, labels, frames = series_landscape(beside=(1.0, 3.0, 0.0))
    assert auto_clusters(labels, frames, 0.01, coords) == [0, 1, 2, 3]
    frames[labels == 4] = 130.0  # 1300 frames against the sphere end's 1200
    assert 4 in auto_clusters(labels, frames, 0.01, coords)


def test_auto_clusters_leave_out_a_species_on_the_axis_that_shares_no_frames_with_the_series():
    """A species whose common lines place it on the series' axis (``df64``'s spheroids) is kept
    by the detour rule; the frames its classes share with the series' clusters tell it apart.
    When the series' ends themselves share no frames, the frames say nothing."""
    from spiscape.vae.data import auto_clusters

    coords, labels, frames = series_landscape(beside=(3.0, 0.14, 0.0))  # on the curve
    assert auto_clusters(labels, frames, 0.01, coords) == [0, 1, 2, 3, 4]
    shares = np.eye(5)
    for a, b in ((0, 1), (1, 2), (2, 3)):  # neighbours along the series share frames
        shares[a, b] = shares[b, a] = 0.05
    shares[4, 1] = shares[1, 4] = 1e-5  # the species: almost none
    assert auto_clusters(labels, frames, 0.01, coords, shares=shares,
                         min_share=5e-4) == [0, 1, 2, 3]
    assert auto_clusters(labels, frames, 0.01, coords, shares=shares,
                         min_share=0.0) == [0, 1, 2, 3, 4]  # off
    cut = shares.copy()
    cut[1, 2] = cut[2, 1] = 0.0  # the ends not linked: every cluster on the axis stays
    assert auto_clusters(labels, frames, 0.01, coords, shares=cut,
                         min_share=5e-4) == [0, 1, 2, 3, 4]


def test_frame_weights_and_loss_q_min():
    from spiscape.vae.data import frame_weights, loss_weight

    frames = np.array([1.0, 4.0, 16.0, np.nan])
    assert np.allclose(frame_weights(frames, "none"), 1.0)
    w = frame_weights(frames, "sqrt")
    assert np.isclose(w.mean(), 1.0) and w[3] == 0.0 and np.isclose(w[2] / w[1], 2.0)
    assert np.isclose(frame_weights(frames, "frames")[2] / frame_weights(frames, "frames")[1], 4)
    qn = np.array([[1.0, 2.5, 4.0, 9.0]])
    sup = np.ones_like(qn, dtype=bool)
    assert loss_weight(sup, qn, 11, q_min=2.0).tolist() == [[False, True, True, False]]


def test_pure_averages_rule():
    from spiscape.vae.scoring import pure_averages

    mask, rule = pure_averages(np.array([0.85, 0.1, 0.95, np.nan]))
    assert mask.tolist() == [True, False, True, False] and "0.8" in rule
    mask, rule = pure_averages(np.array([0.5, 0.1, 0.7, 0.6, 0.2]), fallback=3)
    assert mask.tolist() == [True, False, True, True, False] and "most alike" in rule


def test_weighted_training_runs_and_ignores_zero_weight(tiny, tmp_path):
    # an average of weight 0 has no pull: garbage counts in it change nothing
    _, sim = tiny
    cfg = small_cfg(epochs=2, check_every=0)
    tens, weight, q, prof = training_inputs(sim, cfg)
    tens["weight"] = torch.ones(tens["image"].shape[0])
    tens["weight"][0] = 0.0
    ctx = setup_distributed("cpu")
    m1, _ = train(cfg, tens, weight, q, prof, tmp_path / "a", ctx=ctx)
    tens["counts"] = tens["counts"].clone()
    tens["counts"][0] = tens["counts"][0] * 7.0 + 3.0
    m2, _ = train(cfg, tens, weight, q, prof, tmp_path / "b", ctx=ctx)
    for a, b in zip(m1.decoder.parameters(), m2.decoder.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_default_kl_weight_keeps_the_latent_of_faint_averages(tmp_path):
    # averages.h5 holds photons per pixel *per frame*: an average of many faint frames is
    # precise but its per-pixel deviance is small, so a KL weight fitted to bright data lets the
    # posterior collapse onto the prior and every average decodes one shape (sim72lowphot of the
    # validation matrix at 0.01: latent range 0.06). Cube and sphere averages of ~50 photons per
    # pixel in the first ring, in the units of a 30-frame average:
    from scipy.stats import spearmanr

    sim = synthetic_averages(analytic_volumes(), S, DETD, EWALD, 32, np.random.default_rng(1),
                             photons=50.0, beamstop=1.0)
    sim["intens"] = sim["intens"] / 30.0
    tens, weight, q, prof = training_inputs(sim, small_cfg())
    spans = {}
    for kl in (TrainConfig().kl_weight, 0.01):
        cfg = small_cfg(epochs=80, check_every=0, lr=1e-2, kl_weight=kl)
        model, _ = train(cfg, tens, weight, q, prof, tmp_path / str(kl),
                         ctx=setup_distributed("cpu"))
        with torch.no_grad():
            _, mu, _ = model(tens["image"], torch.as_tensor(weight, dtype=torch.float32),
                             tens["quaternion"], tens["log_gain"], sample=False)
        mu = mu[:, 0].numpy()
        spans[kl] = (float(np.ptp(mu)), abs(spearmanr(mu, sim["shape_index"]).statistic))
    span, rho = spans[TrainConfig().kl_weight]
    assert span > 1.0 and rho > 0.7, spans  # the two shapes apart on the latent
    assert spans[0.01][0] < 0.3, spans  # the old default: collapsed


def test_size_averaged_reference():
    from spiscape.metrics.volumes import size_averaged

    vol = analytic_volumes(11)[0]
    assert np.allclose(size_averaged(vol, np.ones(5)), vol)
    # one size s: s^6 I(s q); at q = 0 the centre voxel scales by s^6 exactly
    out = size_averaged(vol, np.full(3, 0.5))
    assert np.isclose(out[5, 5, 5], 0.5**6 * vol[5, 5, 5])
    assert np.isclose(out[5, 5, 7], 0.5**6 * vol[5, 5, 6])
    # a spread lowers the contrast of the fringes, never the centre's share
    spread = size_averaged(vol, 1.0 + 0.05 * np.random.default_rng(0).standard_normal(200))
    assert spread.shape == vol.shape and np.all(np.isfinite(spread))


def test_best_size_scale_reads_the_size_from_the_fringes():
    """The analytic cube and sphere form factors of particles 3 % larger / 4 % smaller than the
    reference (exact, not interpolated) give back their sizes from the fringes alone."""
    from spiscape.metrics.volumes import best_size_scale

    n = 41
    ax = (np.arange(n) - n // 2) / n
    q = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1)
    for true in (1.03, 0.96):
        for intens in (lambda s: cube_form_factor(q, 8.0 * s) ** 2,
                       lambda s: sphere_form_factor(np.linalg.norm(q, axis=-1), 5.0 * s) ** 2):
            res = best_size_scale(intens(true), intens(1.0), qmin=2.0, qmax=20.0,
                                  fraction=0.7)
            assert abs(res["scale"] - true) < 0.005, (true, res["scale"])
            assert res["score"] > 0.99 and not res["at_edge"]
    # a sphere 20 % larger is beyond the 0.9..1.1 grid: the fit says so instead of a size
    beyond = best_size_scale(sphere_form_factor(np.linalg.norm(q, axis=-1), 6.0) ** 2,
                             sphere_form_factor(np.linalg.norm(q, axis=-1), 5.0) ** 2,
                             qmin=2.0, qmax=20.0, fraction=0.7)
    assert beyond["at_edge"] and beyond["scale"] == pytest.approx(1.1)


def test_pixel_weights_radial_exponent():
    from spiscape.errors import ConfigError
    from spiscape.vae.data import pixel_weights

    mask = np.array([[True, True, True, False]])
    qnorm = np.array([[1.0, 2.0, 3.0, 4.0]])
    profile = np.array([100.0, 100.0, 10.0, 1.0, 1.0])
    np.testing.assert_allclose(pixel_weights(mask, qnorm, profile, 0.0), [[1, 1, 1, 0]])
    w = pixel_weights(mask, qnorm, profile, 1.0)
    assert w[0, 3] == 0 and w[mask].min() == pytest.approx(1.0)  # the brightest shell: 1
    # alpha 1: each pixel weighs 1 / I_0(|q|): a 100x fainter shell 100x more per photon
    assert w[0, 2] / w[0, 0] == pytest.approx(100.0)
    assert pixel_weights(mask, qnorm, profile, 0.5)[0, 2] / \
        pixel_weights(mask, qnorm, profile, 0.5)[0, 0] == pytest.approx(10.0)
    with pytest.raises(ConfigError, match="radial weighting"):
        pixel_weights(mask, qnorm, profile, -1.0)


def test_learning_rate_schedules():
    from spiscape.errors import ConfigError
    from spiscape.vae.train import make_scheduler

    def rates(**kw):
        cfg = small_cfg(epochs=10, lr=1e-2, **kw)
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        sched = make_scheduler(opt, cfg)
        out = []
        for _ in range(cfg.epochs):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out, opt.param_groups[0]["lr"]

    seen, last = rates(lr_schedule="cosine", lr_final=0.05)
    assert seen[0] == pytest.approx(1e-2) and last == pytest.approx(5e-4)
    assert all(a >= b for a, b in zip(seen, seen[1:], strict=False))
    seen, last = rates(lr_schedule="constant")
    assert set(seen) == {1e-2} and last == 1e-2
    with pytest.raises(ConfigError, match="schedule"):
        rates(lr_schedule="step")


def test_q_min_auto_is_the_beamstop_edge_of_the_detector_mask():
    from spiscape.io import Detector
    from spiscape.vae.data import beamstop_radius

    size = 21
    x, y = (np.indices((size, size)) - size // 2).reshape(2, -1).astype(float)
    for radius in (2.5, 4.2):
        mask = np.where(np.hypot(x, y) < radius, 2, 0).astype(np.uint8)
        det = Detector(qx=x, qy=y, qz=np.zeros_like(x), corr=np.ones_like(x), mask=mask,
                       detd=100.0, ewald_rad=100.0)
        edge = beamstop_radius(det)
        assert radius <= edge < radius + 1
        assert edge == np.hypot(x, y)[mask == 0].min()


class _Trap:
    """A pickle that runs code when it is loaded: what a file planted in an output folder does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_and_models_are_never_unpickled(tmp_path):
    from spiscape.errors import InputError
    from spiscape.io.weights import plain
    from spiscape.vae import train

    for name, load in (("checkpoint.pt", train.load_checkpoint), ("model.pt", train.load_model)):
        marker = tmp_path / f"{name}.ran"
        torch.save({"model": _Trap(marker)}, tmp_path / name)
        with pytest.raises(InputError, match="not a spiscape"):
            load(tmp_path / name)
        assert not marker.exists()
    # what spiscape writes reads back, NumPy arrays as tensors
    values = {"a": np.arange(3.0), "b": [np.float32(2.5), (1, None)], "c": Path("x/y")}
    torch.save(plain(values), tmp_path / "ok.pt")
    back = train.load_checkpoint(tmp_path / "ok.pt")
    assert back["b"] == [2.5, (1, None)] and back["c"] == "x/y"
    np.testing.assert_array_equal(np.asarray(back["a"]), values["a"])


def test_q_step_spans_the_detector_with_the_same_grid(tiny, tmp_path, capsys):
    """--q-step auto: the V^3 grid's voxel is as many detector pixels as it takes to span the
    averages' measured pixels (the volumes' q per voxel and measured range follow);
    --emc-merge, which predicts averages on the pixel grid, refuses another step."""
    from spiscape.cli import main

    out, sim = tiny
    small = 11
    args = ["vae", "--averages", str(out / "averages.h5"), "--detector",
            str(out / "detector.h5"), "--orientation", str(out / "orientation.h5"),
            "--epochs", "1", "--volume-size", str(small), "--batch-size", "8",
            "--dec-channels", "8", "--enc-channels", "4", "--num-volumes", "2", "--device",
            "cpu", "--no-figures", "--q-per-pixel", "0.01"]
    assert main(args + ["--out-dir", str(tmp_path / "auto"), "--q-step", "auto"]) == 0
    with h5py.File(tmp_path / "auto/volumes.h5") as f:
        step, q_max = f.attrs["q_step_pixels"], f.attrs["q_max_measured"]
        q_per_voxel = f.attrs["q_per_voxel_inv_nm"]
    assert step > 1 and q_max <= small // 2 - 1 + 1e-9
    assert q_per_voxel == pytest.approx(0.01 * step)
    capsys.readouterr()
    assert main(args + ["--out-dir", str(tmp_path / "m"), "--q-step", "2", "--emc-merge",
                        "--replicates", str(out / "averages.h5")]) == 2
    assert "--q-step 1" in capsys.readouterr().err


def test_on_grid_crops_or_samples_a_centred_volume():
    from spiscape.metrics.volumes import centre_crop, on_grid

    rng = np.random.default_rng(0)
    vol = rng.random((21, 21, 21))
    np.testing.assert_array_equal(on_grid(vol, 11), centre_crop(vol, 11))
    np.testing.assert_allclose(on_grid(vol, 11, 2.0), vol[0:21:2, 0:21:2, 0:21:2], atol=1e-9)


# --------------------------------------------------------------------------- size correction
def test_size_offsets_remove_a_population_spread_and_keep_sizes_between_clusters():
    """A population with a size spread is kept whole: pairwise scales from the common lines'
    size search (log(size_i / size_j) = log scales[i, j]) give each average its log size against
    its cluster's frame-weighted mean, so all its averages are sliced from one volume; the size
    difference between two clusters (a melt that changes the volume) is not corrected away."""
    from spiscape.vae.data import size_offsets

    rng = np.random.default_rng(5)
    # two populations (clusters 3 and 7) of 9 averages each, sizes spread by 7 %, means 1.0 and
    # 0.8, a 19th average of the second that is not trained on and one outlier (label -1)
    log_size = np.concatenate([0.07 * rng.standard_normal(9), np.log(0.8)
                               + 0.07 * rng.standard_normal(11)])
    groups = np.repeat([3, 7, -1], [9, 10, 1])
    frames = rng.integers(5, 300, size=20).astype(float)
    scales = np.exp(log_size[:, None] - log_size[None, :])
    selected = groups >= 0
    selected[18] = False  # not trained on: no offset, and not in its cluster's mean
    d = size_offsets(scales, groups, selected, frames)
    for g in (3, 7):
        pop = (groups == g) & selected
        mean = (frames[pop] * log_size[pop]).sum() / frames[pop].sum()
        assert np.allclose(d[pop], log_size[pop] - mean, atol=1e-12)
        # each population's averages are sliced from one volume at its mean size, so the
        # two populations' mean sizes (about 20 % apart) stay in the decoded volumes
        assert np.allclose((log_size - d)[pop], mean, atol=1e-12)
    assert d[18] == 0.0 and d[19] == 0.0
    # without a size search every scale is 1: nothing to correct
    assert not np.any(size_offsets(np.ones((20, 20)), groups, selected, frames))


def test_slicing_at_a_scaled_q_is_a_larger_particle():
    """An average of a particle s times larger is the reference volume sliced at s R q (times
    s^6, which the fitted gain absorbs; the form factor here is normalised to 1 at q = 0): the
    sign convention of --size-correction, checked on the analytic sphere."""
    n = 31
    ax = np.arange(n) - n // 2
    qn = np.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2) / n
    ref = sphere_form_factor(qn, 2.5) ** 2
    q = vm.ewald_grid(S, DETD, EWALD).reshape(3, -1)
    rot = vm.quaternion_to_matrix(torch.tensor(random_quaternions(2, np.random.default_rng(1))))
    s = 1.1
    got = vm.slice_volumes(torch.tensor(ref).expand(2, n, n, n), torch.tensor(q), rot * s)
    qd = np.linalg.norm(q, axis=0) / n
    larger = sphere_form_factor(qd, 2.5 * s) ** 2
    smaller = sphere_form_factor(qd, 2.5 / s) ** 2
    err = np.abs(got.numpy() - larger[None]).max()  # trilinear on fringes of ~6 voxels
    assert err < 0.05 * larger.max()
    assert err < 0.2 * np.abs(got.numpy() - smaller[None]).max()


def test_training_with_size_offsets_keeps_the_scaled_pixels_inside_the_volume(tiny, tmp_path):
    """log_scale reaches the slicing; the loss stays finite where exp(d) |q| leaves the grid."""
    out, sim = tiny
    cfg = small_cfg(epochs=2)
    tens, weight, q, prof = training_inputs(sim, cfg)
    tens["log_scale"] = torch.linspace(-0.1, 0.1, tens["image"].shape[0])
    model, result = train(cfg, tens, weight, q, prof, tmp_path)
    assert np.all(np.isfinite(result["history"]["loss"]))
    rot = vm.quaternion_to_matrix(tens["quaternion"][:2])
    with torch.no_grad():
        a, _, _ = model(tens["image"][:2], torch.as_tensor(weight, dtype=torch.float32),
                        tens["quaternion"][:2], tens["log_gain"][:2], sample=False,
                        log_scale=torch.tensor([0.1, 0.1]))
        mu, _ = model.encoder(tens["image"][:2], torch.as_tensor(weight, dtype=torch.float32),
                              tens["quaternion"][:2], tens["log_gain"][:2])
        b = vm.slice_volumes(model.symmetric(mu), model.q, rot * float(np.exp(0.1)),
                             folded=True)
    assert torch.allclose(a.reshape(2, -1), b, rtol=1e-5)


def test_size_correction_needs_matching_common_lines(tiny, tmp_path):
    from spiscape.errors import InputError
    from spiscape.io.commonlines import read_pair_scales
    from spiscape.vae.data import read_inputs

    out, sim = tiny
    data = read_inputs(out / "averages.h5", out / "orientation.h5")
    n = data.klass.size
    path = tmp_path / "commonlines.h5"
    with h5py.File(path, "w") as f:
        f["scales"] = np.ones((n, n))
        f["replicate"] = data.replicate
        f["class"] = data.klass[::-1]
    with pytest.raises(InputError, match="order differs"):
        read_pair_scales(path, data.replicate, data.klass)
    with h5py.File(path, "a") as f:
        del f["class"]
        f["class"] = data.klass
        f["scales"][0, 1] = np.nan
    with pytest.raises(InputError, match="not finite"):
        read_pair_scales(path, data.replicate, data.klass)


def test_a_population_with_a_size_spread_decodes_at_one_size_with_the_correction(tmp_path):
    """Sphere averages of five sizes (0.88-1.12): without the size correction the latent carries
    the size and the decoder spreads it along the latent (about 0.9 to 1.1 of the middle size
    at the latent's 10th and 90th percentiles); sliced at their own sizes (log size against the
    population's mean) all of the latent decodes one sphere at the mean size."""
    from spiscape.metrics.volumes import best_size_scale

    ax = (np.arange(V) - V // 2) / V
    qn = np.linalg.norm(np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1), axis=-1)
    sizes = np.array([0.88, 0.94, 1.0, 1.06, 1.12])
    vols = np.stack([sphere_form_factor(qn, 2.5 * s) ** 2 * 1e3 + 1e-3 for s in sizes])
    sim = synthetic_averages(vols, S, DETD, EWALD, 40, np.random.default_rng(4), photons=300.0,
                             beamstop=1.0)
    decoded = {}
    for corrected in (False, True):
        cfg = small_cfg(epochs=80, kl_weight=0.001)
        tens, weight, q, prof = training_inputs(sim, cfg)
        if corrected:
            log_size = np.log(sizes[sim["shape_index"]])
            tens["log_scale"] = torch.tensor(log_size - log_size.mean(), dtype=torch.float32)
        model, _ = train(cfg, tens, weight, q, prof, tmp_path / str(corrected))
        with torch.no_grad():
            mu, _ = model.encoder(tens["image"], torch.as_tensor(weight, dtype=torch.float32),
                                  tens["quaternion"], tens["log_gain"])
            z = torch.quantile(mu[:, 0], torch.tensor([0.1, 0.5, 0.9]))[:, None]
            vol = model.volumes(z).numpy()
        decoded[corrected] = np.array([best_size_scale(v, vols[2], qmin=1.5, qmax=6.0,
                                                       fraction=0.7)["scale"] for v in vol])
    assert np.ptp(decoded[False]) > 0.1, decoded
    assert np.ptp(decoded[True]) < 0.02, decoded
    assert np.all(np.abs(decoded[True] - 1.0) < 0.04), decoded


def test_cli_drops_the_averages_the_decoder_cannot_explain_and_trains_again(tiny, tmp_path):
    """--drop-misfits: a first training in first_pass/, the averages whose misfit under it is a
    robust outlier left out (spiscape.vae.misfit), the training repeated without them."""
    import json

    from spiscape.cli import main

    out, sim = tiny
    rc = main(["vae", "--averages", str(out / "averages.h5"), "--orientation",
               str(out / "orientation.h5"), "--detector", str(out / "detector.h5"),
               "--epochs", "2", "--volume-size", str(V), "--batch-size", "8",
               "--dec-channels", "8", "--enc-channels", "4", "--num-volumes", "3",
               "--device", "cpu", "--no-figures", "--drop-misfits", "1.0",
               "--out-dir", str(tmp_path / "vae")])
    assert rc == 0
    scores = json.loads((tmp_path / "vae/training.json").read_text())["scores"]
    assert (tmp_path / "vae/first_pass/checkpoint.pt").exists()
    with h5py.File(tmp_path / "vae/latent.h5") as f:
        kept = int(f["selected"][()].sum())
    assert scores["misfits_dropped"] >= 1 and kept == 24 - scores["misfits_dropped"]
