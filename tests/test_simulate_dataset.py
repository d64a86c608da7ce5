"""End to end: simulate_dataset and `spiscape simulate` on tiny datasets, read back through io."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spiscape import cli
from spiscape.io import read_detector, read_photons
from spiscape.simulate import LABELS, POPULATIONS, SimulationParams, read_truth, simulate_dataset
from spiscape.simulate import frames as fr

# a small detector (binning 8: 29 x 29 pixels) and grid keep every dataset here well under a second
SMALL = dict(
    binning=8, grid_size=36, melting_levels=5, dimer_sphere_diameter_nm=25.0,
    rod_length_nm=50.0, rod_diameter_nm=15.0, mean_photons=600.0,
)


def small_params(**changes) -> SimulationParams:
    return SimulationParams.from_dict({**SMALL, **changes})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    params = small_params(num_frames=400, seed=7, chunk_frames=64)
    summary = simulate_dataset(params, out)
    return out, params, summary


def test_files_read_back_through_io(dataset):
    out, params, summary = dataset
    det = read_detector(out / "detector.h5")
    photons = read_photons(out / "photons.h5", num_pix=det.num_pix)
    truth = read_truth(out / "truth.h5")
    assert photons.num_frames == params.num_frames == truth.num_frames
    assert det.num_pix == photons.num_pix == 29 * 29 == summary["num_pix"]
    np.testing.assert_array_equal(photons.photons_per_frame(), truth.photons)
    # bad pixels (mask 2) record nothing
    assert photons.powder()[det.mask == 2].sum() == 0
    assert photons.powder()[det.mask == 0].sum() > 0
    assert json.loads((out / "simulate.json").read_text())["num_frames"] == params.num_frames


def test_truth_layout(dataset):
    out, params, _ = dataset
    truth = read_truth(out / "truth.h5")
    n = params.num_frames
    assert truth.label_names == list(POPULATIONS)
    assert truth.label.dtype == np.int8 and truth.label.shape == (n,)
    for name in ("t", "scale", "size", "photons", "shape_index", "expected_photons"):
        assert truth.frames[name].shape == (n,)
    assert truth.quaternion.shape == (n, 4)
    np.testing.assert_allclose(np.linalg.norm(truth.quaternion, axis=1), 1.0)
    contaminant = np.isin(truth.label, [LABELS["dimer"], LABELS["rod"]])
    np.testing.assert_array_equal(np.isnan(truth.t), contaminant)
    assert np.all(truth.t[truth.label == LABELS["cube"]] == 0.0)
    assert np.all(truth.t[truth.label == LABELS["sphere"]] == 1.0)
    melting = truth.label == LABELS["melting"]
    levels = np.linspace(0, 1, params.melting_levels)
    assert np.all(np.isin(truth.t[melting], levels))
    # every population is present, and each frame's volume has its label and t
    assert set(np.unique(truth.label)) == set(range(len(POPULATIONS)))
    np.testing.assert_array_equal(truth.volume_info["label"][truth.shape_index], truth.label)
    vol_t = truth.volume_info["t"][truth.shape_index]
    np.testing.assert_array_equal(np.isnan(vol_t), contaminant)
    np.testing.assert_array_equal(vol_t[~contaminant], truth.t[~contaminant])
    k = params.melting_levels + 4
    assert truth.volumes.shape == (k, 36, 36, 36) and truth.volumes.dtype == np.float32
    assert np.all(truth.size[contaminant] == 1.0)
    spread = truth.size[truth.label == LABELS["cube"]].std()
    assert 0.5 * params.cube_edge_spread < spread < 1.5 * params.cube_edge_spread
    assert truth.attrs["grid_centre"] == 18
    assert json.loads(truth.attrs["params"])["seed"] == 7
    assert truth.attrs["q_per_voxel_inv_nm"] == pytest.approx(1 / (36 * truth.attrs[
        "voxel_size_nm"]))
    # melting volumes grow by 10 % from cube to sphere
    v = truth.volume_info["particle_volume_nm3"]
    assert v[params.melting_levels] / v[1] == pytest.approx(1.10)


def test_volumes_are_friedel_symmetric_and_centred(dataset):
    out, _, _ = dataset
    vol = read_truth(out / "truth.h5").volumes
    inner = vol[:, 1:, 1:, 1:]
    np.testing.assert_allclose(inner, inner[:, ::-1, ::-1, ::-1], rtol=1e-5)
    flat = vol.reshape(vol.shape[0], -1)
    np.testing.assert_array_equal(np.argmax(flat, axis=1), np.ravel_multi_index((18,) * 3,
                                                                                 (36,) * 3))


def test_mean_photons_match_request(dataset):
    _, params, summary = dataset
    counts_std = summary["photons_per_frame_std"]
    standard_error = counts_std / np.sqrt(params.num_frames)
    assert abs(summary["photons_per_frame_mean"] - params.mean_photons) < 4 * standard_error


def test_frames_are_poisson_samples_of_the_truth(dataset):
    """Rebuild every frame's expected counts from truth.h5 alone (the documented formula
    scale * size^6 * intens[shape](size R q) * corr) and check the photons against them."""
    out, _, _ = dataset
    det = read_detector(out / "detector.h5")
    truth = read_truth(out / "truth.h5")
    counts = read_photons(out / "photons.h5").to_dense()
    q = np.stack([det.qx, det.qy, det.qz])
    lam = np.zeros(counts.shape)
    rotations = fr.quaternion_to_matrix(truth.quaternion)
    for k in np.unique(truth.shape_index):
        sel = truth.shape_index == k
        lam[sel] = fr.expected_photons(
            truth.volumes[k].astype(np.float64), q, det.corr, rotations[sel], truth.size[sel],
            truth.scale[sel], bad=det.mask == 2,
        )
    np.testing.assert_allclose(lam.sum(axis=1), truth.expected_photons, rtol=1e-4)
    # Pearson's chi^2 per degree of freedom is 1 for Poisson counts (pixels with tiny means are
    # left out: their chi^2 terms are 0 or huge and make the average noisy)
    used = lam > 0.01
    chi2 = ((counts - lam) ** 2)[used] / lam[used]
    assert chi2.mean() == pytest.approx(1.0, abs=0.03)
    # bright pixels: variance of (counts - lam) equals lam
    bright = lam > 2
    assert np.mean((counts - lam)[bright] ** 2) / np.mean(lam[bright]) == pytest.approx(1, abs=0.05)


def test_mean_photons_with_fixed_fluence(tmp_path):
    params = small_params(num_frames=300, fractions={"sphere": 0.5, "cube": 0.5}, seed=3,
                          fluence_shape=0, sphere_diameter_spread=0.0, cube_edge_spread=0.0)
    summary = simulate_dataset(params, tmp_path)
    assert np.all(read_truth(tmp_path / "truth.h5", volumes=False).scale == 1.0)
    standard_error = summary["photons_per_frame_std"] / np.sqrt(params.num_frames)
    target = params.mean_photons
    assert abs(summary["photons_per_frame_mean"] - target) < 4 * standard_error + 0.005 * target


def test_background_photons(tmp_path):
    params = small_params(num_frames=200, background_photons=100.0, seed=4)
    simulate_dataset(params, tmp_path)
    det = read_detector(tmp_path / "detector.h5")
    assert det.background is not None
    assert det.background.sum() == pytest.approx(100.0)
    assert np.all(det.background[det.mask == 2] == 0)


def test_same_seed_same_arrays_other_seed_differs(dataset, tmp_path):
    out, params, _ = dataset
    # same parameters but a different chunk size: the arrays must not change
    again = dict(params.to_dict(), chunk_frames=97)
    simulate_dataset(again, tmp_path / "same")
    simulate_dataset(dict(again, seed=8), tmp_path / "other")
    first, same, other = (read_photons(p / "photons.h5") for p in
                          (out, tmp_path / "same", tmp_path / "other"))
    assert first.equals(same)
    assert not first.equals(other)
    t1, t2, t3 = (read_truth(p / "truth.h5") for p in (out, tmp_path / "same", tmp_path / "other"))
    for name in t1.frames:
        np.testing.assert_array_equal(t1.frames[name], t2.frames[name])
    np.testing.assert_array_equal(t1.volumes, t2.volumes)
    assert not np.array_equal(t1.quaternion, t3.quaternion)
    assert not np.array_equal(t1.label, t3.label)


def test_cli_simulates(tmp_path):
    out = tmp_path / "data"
    code = cli.main([
        "simulate", "--out-dir", str(out), "--num-frames", "50", "--binning", "8",
        "--grid-size", "36", "--melting-levels", "3", "--rod-length-nm", "50",
        "--dimer-sphere-diameter-nm", "25", "--fractions", "cube=0.5", "melting=0.3", "rod=0.2",
    ])
    assert code == 0
    summary = json.loads((out / "simulate.json").read_text())
    assert summary["num_frames"] == 50
    assert summary["populations"]["sphere"] == 0 and summary["populations"]["dimer"] == 0
    truth = read_truth(out / "truth.h5", volumes=False)
    params = json.loads(truth.attrs["params"])
    assert params["fractions"]["melting"] == pytest.approx(0.3) and params["binning"] == 8


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--fractions", "cube=0.9", "sphere=0.8"], "sum to 1.7"),
        (["--mean-photons", "-5"], "mean_photons"),
        (["--grid-size", "16"], "grid_size"),
        (["--rod-length-nm", "300"], "does not fit"),
        (["--fractions", "cube=0.5", "pyramid=0.5"], "pyramid"),
    ],
)
def test_cli_rejects_impossible_config(tmp_path, capsys, flags, message):
    out = tmp_path / "data"
    code = cli.main(["simulate", "--out-dir", str(out), "--num-frames", "20", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("spiscape simulate: error:") and message in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_cli_flags_match_fields():
    from spiscape.workflow_config import command_parser

    parser = command_parser("simulate")
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for name in SimulationParams().to_dict():
        assert "--" + name.replace("_", "-") in flags
