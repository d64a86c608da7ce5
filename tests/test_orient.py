"""Orientation and gain of 2D class averages (spiscape orient): rotations, slices, search, CLI."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from spiscape import cli
from spiscape.io import Detector, write_detector
from spiscape.orient import orient_averages
from spiscape.orient import rotations as rot
from spiscape.orient.slices import AnalyticReference, VolumeReference, ewald_points, rotated_slices
from spiscape.simulate.intensity import cube_form_factor

# a small version of the demo geometry: 42 nm cube fringes every ~4.3 pixels
SIZE, DETD, Q_PER_PIXEL = 41, 880.0, 0.0055
CUBE = 42.0
SPHERE = 54.0  # diameter of the sphere of the melted cube's volume (+10 %)
M3M = rot.point_group("m-3m")


def beamstop_support(size: int, radius: float = 2.5) -> np.ndarray:
    c = (size - 1) / 2.0
    i, j = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    return np.hypot(i, j) > radius


def make_averages(kind: str, quats: np.ndarray, size: int = SIZE, scale: float = 50.0):
    """Noiseless averages: the reference intensity at R q of the average's Ewald points."""
    points = ewald_points(size, DETD, DETD)
    size_nm = CUBE if kind == "cube" else SPHERE
    ref = AnalyticReference(kind, size_nm, Q_PER_PIXEL)
    return scale * np.asarray(rotated_slices(ref, points, rot.to_matrix(quats)),
                              dtype=np.float64).reshape(len(quats), size, size)


@pytest.fixture(scope="module")
def cube_run():
    rng = np.random.default_rng(7)
    truth = rot.canonical(rng.normal(size=(8, 4)))  # uniform, in-plane angle included
    averages = make_averages("cube", truth)
    result = orient_averages(averages, beamstop_support(SIZE), ewald_points(SIZE, DETD, DETD),
                             AnalyticReference("cube", CUBE, Q_PER_PIXEL), "m-3m",
                             step_deg=6.0, refine_deg=1.0)
    return truth, result


def test_recovers_cube_orientations(cube_run):
    """The issue's criterion: median error modulo the cube's symmetry (and Friedel) <= 3 deg."""
    truth, result = cube_run
    error = rot.misorientation_deg(truth, result.quaternion, M3M, friedel=True)
    assert np.median(error) <= 3.0, error
    assert np.mean(error < 3.0) >= 0.8, error
    # the Friedel twin R Rz(pi) differs only by the Ewald curvature: CC a little below 1
    assert np.all(result.cc > 0.98)
    # reported in the fundamental zone, w >= 0
    assert np.all(rot.in_asymmetric_unit(result.quaternion, M3M))
    assert np.all(result.quaternion[:, 0] >= 0)


def test_cube_averages_have_higher_gain_than_sphere_averages(cube_run):
    _, cube = cube_run
    quats = rot.canonical(np.random.default_rng(8).normal(size=(4, 4)))
    spheres = orient_averages(make_averages("sphere", quats), beamstop_support(SIZE),
                              ewald_points(SIZE, DETD, DETD),
                              AnalyticReference("cube", CUBE, Q_PER_PIXEL), "m-3m",
                              step_deg=8.0, refine_deg=0)
    assert cube.gain.min() > spheres.gain.max()
    assert np.all(spheres.gain >= 1.0) and np.all(cube.gain > 1.3)


def test_sphere_reference_has_nothing_to_orient():
    quats = rot.canonical(np.random.default_rng(1).normal(size=(3, 4)))
    result = orient_averages(make_averages("sphere", quats, size=21), np.ones((21, 21), bool),
                             ewald_points(21, DETD, DETD),
                             AnalyticReference("sphere", SPHERE, Q_PER_PIXEL))
    np.testing.assert_allclose(result.gain, 1.0)
    np.testing.assert_allclose(result.quaternion, np.tile([1.0, 0, 0, 0], (3, 1)))
    assert np.all(result.cc > 0.999)
    assert "isotropic" in result.info["note"]


def test_point_group_is_a_group_and_asymmetric_unit_is_one_24th():
    assert M3M.shape == (24, 4)
    np.testing.assert_allclose(M3M[0], [1, 0, 0, 0])
    products = rot.canonical(rot.multiply(M3M[:, None], M3M[None, :]).reshape(-1, 4))
    closest = np.abs(products @ M3M.T).max(axis=1)
    np.testing.assert_allclose(closest, 1.0, atol=1e-12)  # closed under multiplication
    grid = rot.so3_grid(8.0)
    assert len(grid) == rot.grid_count(8.0)
    unit = rot.asymmetric_unit(grid, M3M)
    assert len(unit) / len(grid) == pytest.approx(1 / 24, rel=0.05)
    assert rot.angle_deg(unit).max() < 63.0  # the cube's fundamental zone reaches 62.8 deg
    assert len(rot.asymmetric_unit(grid, rot.point_group("1"))) == len(grid)


def test_grid_covers_so3_at_its_step():
    grid = rot.so3_grid(10.0)
    probes = rot.canonical(np.random.default_rng(3).normal(size=(300, 4)))
    nearest = rot.angle_deg(np.abs(probes @ grid.T).max(axis=1)[:, None] * [1, 0, 0, 0])
    assert nearest.max() < 10.0
    assert np.median(nearest) < 6.5


def test_misorientation_symmetric_and_zero_for_equivalents():
    rng = np.random.default_rng(5)
    q1 = rot.canonical(rng.normal(size=(50, 4)))
    q2 = rot.canonical(rng.normal(size=(50, 4)))
    np.testing.assert_allclose(rot.misorientation_deg(q1, q2, M3M),
                               rot.misorientation_deg(q2, q1, M3M), atol=1e-9)
    np.testing.assert_allclose(rot.misorientation_deg(q1, q2, M3M, friedel=True),
                               rot.misorientation_deg(q2, q1, M3M, friedel=True), atol=1e-9)
    equivalent = rot.multiply(M3M[rng.integers(24, size=50)], q1)
    np.testing.assert_allclose(rot.misorientation_deg(q1, equivalent, M3M), 0.0, atol=1e-5)
    np.testing.assert_allclose(rot.misorientation_deg(q1, rot.reduce(q1, M3M), M3M), 0.0,
                               atol=1e-5)
    flipped = rot.multiply(q1, [0.0, 0.0, 0.0, 1.0])  # rotated by 180 deg in plane
    np.testing.assert_allclose(rot.misorientation_deg(q1, flipped, M3M, friedel=True), 0.0,
                               atol=1e-5)
    small = rot.multiply(q1, rot.from_rotvec([[0.0, 0.0, np.radians(10.0)]]))
    np.testing.assert_allclose(rot.misorientation_deg(q1, small, M3M), 10.0, atol=1e-6)
    # without symmetry, the plain angle; modulo m-3m never above 62.8 deg
    assert np.all(rot.misorientation_deg(q1, q2) >= rot.misorientation_deg(q1, q2, M3M) - 1e-9)
    assert rot.misorientation_deg(q1, q2, M3M).max() < 63.0


def test_ewald_points_on_the_sphere():
    points = ewald_points(11, 100.0, 100.0)
    np.testing.assert_allclose(points[5 * 11 + 5], 0.0, atol=1e-12)  # centre pixel: q = 0
    np.testing.assert_allclose(np.linalg.norm(points - [0, 0, -100.0], axis=1), 100.0)
    assert np.all(points[:, 2] <= 0)
    # first axis = detector x
    assert points[6 * 11 + 5, 0] > 0 and abs(points[6 * 11 + 5, 1]) < 1e-12


def test_volume_reference_matches_analytic():
    n, q_vox = 65, Q_PER_PIXEL
    axis = (np.arange(n) - n // 2) * q_vox
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)
    volume = VolumeReference(cube_form_factor(grid, CUBE) ** 2, q_vox, Q_PER_PIXEL)
    analytic = AnalyticReference("cube", CUBE, Q_PER_PIXEL)
    quats = rot.canonical(np.random.default_rng(2).normal(size=(3, 4)))
    points = ewald_points(21, DETD, DETD)
    a = np.log(np.asarray(rotated_slices(analytic, points, rot.to_matrix(quats))) + 1e-4)
    v = np.log(np.asarray(rotated_slices(volume, points, rot.to_matrix(quats))) + 1e-4)
    for row_a, row_v in zip(a, v, strict=True):
        assert np.corrcoef(row_a, row_v)[0, 1] > 0.95


# ---------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("orient")
    size = 25
    quats = rot.canonical(np.random.default_rng(4).normal(size=(3, 4)))
    averages = make_averages("cube", quats, size=size)
    with h5py.File(folder / "averages.h5", "w") as f:
        f["intens"] = averages.astype(np.float32)
        f["support"] = beamstop_support(size)
        f["replicate"] = np.zeros(3, dtype=np.int64)
        f["class"] = np.arange(3)
        f["frames"] = np.full(3, 10.0)
    points = ewald_points(size, DETD, DETD)
    write_detector(Detector(qx=points[:, 0], qy=points[:, 1], qz=points[:, 2],
                            corr=np.ones(size * size), mask=np.zeros(size * size, np.uint8),
                            detd=DETD, ewald_rad=DETD), folder / "detector.h5")
    with h5py.File(folder / "truth.h5", "w") as f:
        f.attrs["q_per_voxel_inv_nm"] = Q_PER_PIXEL
    with h5py.File(folder / "no_scale.h5", "w") as f:
        f["intens"] = np.ones((9, 9, 9))
    return folder, quats


def test_cli_writes_orientation_and_figure(cli_inputs):
    folder, quats = cli_inputs
    out = folder / "orientation.h5"
    code = cli.main(["orient", "--averages", str(folder / "averages.h5"), "--detector",
                     str(folder / "detector.h5"), "--truth", str(folder / "truth.h5"),
                     "--out", str(out), "--step-deg", "10", "--refine-deg", "2",
                     "--device", "cpu", "--figure", str(folder / "orientation.png")])
    assert code == 0
    with h5py.File(out, "r") as f:
        assert f["quaternion"].shape == (3, 4)
        assert f["cc"].shape == f["gain"].shape == (3,)
        assert f.attrs["reference"] == "cube" and f.attrs["point_group"] == "m-3m"
        assert f.attrs["num_rotations"] > 0 and "log" in f.attrs["transform"]
        error = rot.misorientation_deg(quats, f["quaternion"][()], M3M, friedel=True)
    assert np.median(error) < 5.0
    assert (folder / "orientation.png").stat().st_size > 0


@pytest.mark.parametrize("extra, message", [
    (["--q-per-pixel", "0.0055", "--averages", "missing.h5"], "no such file"),
    (["--q-per-pixel", "0.0055", "--reference-file", "{folder}/no_scale.h5"],
     "q_per_voxel_inv_nm"),
    (["--truth", "{folder}/averages.h5"], "q_per_voxel_inv_nm"),
])
def test_cli_errors_exit_2(cli_inputs, capsys, extra, message):
    folder, _ = cli_inputs
    args = ["orient", "--averages", str(folder / "averages.h5"), "--detector",
            str(folder / "detector.h5"), "--out", str(folder / "bad.h5"), "--device", "cpu"]
    args += [word.format(folder=folder) for word in extra]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (folder / "bad.h5").exists()


def test_out_of_range_options_stop_while_parsing(cli_inputs, capsys):
    folder, _ = cli_inputs
    with pytest.raises(SystemExit) as exc:
        cli.main(["orient", "--averages", str(folder / "averages.h5"), "--detector",
                  str(folder / "detector.h5"), "--out", str(folder / "bad.h5"),
                  "--q-per-pixel", "0.0055", "--step-deg", "0"])
    assert exc.value.code == 2
    assert "--step-deg: expected a number in (0, 90], got '0'" in capsys.readouterr().err


def test_cli_needs_a_q_scale(cli_inputs):
    folder, _ = cli_inputs
    with pytest.raises(SystemExit) as exc:
        cli.main(["orient", "--averages", str(folder / "averages.h5"), "--detector",
                  str(folder / "detector.h5"), "--out", str(folder / "x.h5")])
    assert exc.value.code == 2


# ------------------------------------------------------------------------------- size fitting
@pytest.mark.parametrize("edge", [31.0, 47.0])
def test_fit_size_finds_the_cube_edge_of_noisy_averages(edge):
    """Poisson averages of cubes of an edge the pipeline was never told: the fitted reference
    edge is within 3 % of it (the old default assumed 42 nm whatever the data)."""
    from spiscape.orient.search import fit_size, size_range

    rng = np.random.default_rng(11)
    quats = rot.canonical(rng.normal(size=(10, 4)))
    points = ewald_points(SIZE, DETD, DETD)
    ref = AnalyticReference("cube", edge, Q_PER_PIXEL)
    clean = 2000.0 * np.asarray(rotated_slices(ref, points, rot.to_matrix(quats)),
                                dtype=np.float64).reshape(len(quats), SIZE, SIZE)
    averages = rng.poisson(clean) / 10.0
    support = beamstop_support(SIZE)
    max_q = float(np.linalg.norm(points[support.reshape(-1)], axis=1).max())
    low, high = size_range(Q_PER_PIXEL, max_q)
    assert low < edge < high
    sizes = np.exp(np.arange(np.log(low), np.log(high), np.log(1.04)))
    size, scores = fit_size(averages, support, points,
                            lambda s: AnalyticReference("cube", s, Q_PER_PIXEL), sizes,
                            step_deg=12.0)
    assert abs(size / edge - 1) < 0.03, (size, edge)
    assert scores[size] == max(scores.values())


def test_cli_size_auto_writes_the_fitted_size(cli_inputs):
    folder, quats = cli_inputs
    out = folder / "orientation_auto.h5"
    code = cli.main(["orient", "--averages", str(folder / "averages.h5"), "--detector",
                     str(folder / "detector.h5"), "--q-per-pixel", str(Q_PER_PIXEL),
                     "--out", str(out), "--step-deg", "10", "--refine-deg", "2",
                     "--device", "cpu", "--size-nm", "auto"])
    assert code == 0
    with h5py.File(out, "r") as f:
        assert abs(f.attrs["size_nm"] / CUBE - 1) < 0.05
        error = rot.misorientation_deg(quats, f["quaternion"][()], M3M, friedel=True)
    assert np.median(error) < 5.0
