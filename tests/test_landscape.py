"""Per-frame landscape (weighting, replicates, unassigned frames), its scores, and select."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from spiscape import cli
from spiscape.embed.landscape import average_truth, frame_coordinates, replicate_stability
from spiscape.io import SparsePhotons, read_photons, write_photons
from spiscape.io.frames import read_landscape, write_landscape
from spiscape.io.replicate import Replicate
from spiscape.metrics.landscape import (
    melting_spearman,
    population_ari,
    populations,
    size_spearman,
)

# averages.h5 rows: (replicate, class) = (0, 0), (0, 1), (1, 0); replicate 0's class 2 and
# replicate 1's class 1 were left out of averages.h5 (too few frames)
REPLICATE_OF = np.array([0, 0, 1])
CLASS_OF = np.array([0, 1, 0])
COORDS = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
LABELS = np.array([0, 1, 1])


def hand_made_replicates():
    rep0 = Replicate(0, np.array([0, 1]), np.array([[0.5, 0.25, 0.25],   # frame 0
                                                   [0.0, 0.0, 1.0]]))    # frame 1: dropped only
    rep1 = Replicate(1, np.array([0, 1]), np.array([[1.0, 0.0],          # frame 0
                                                   [0.6, 0.4]]))         # frame 1
    return [rep0, rep1]  # frame 2 is in no replicate


def test_frame_weighting_by_hand():
    result = frame_coordinates(3, hand_made_replicates(), REPLICATE_OF, CLASS_OF, COORDS, LABELS)
    # frame 0: rep0 renormalised over kept classes (2/3, 1/3) -> (1/3, 0); rep1 -> (0, 1); mean
    np.testing.assert_allclose(result["coords"][0], [1 / 6, 1 / 2])
    # frame 1: rep0 holds it only in a dropped class, so rep1 alone places it (0.6 -> 1)
    np.testing.assert_allclose(result["coords"][1], [0.0, 1.0])
    assert np.all(np.isnan(result["coords"][2]))
    assert result["num_replicates"].tolist() == [2, 1, 0]
    # votes of frame 0: cluster 0 gets 2/3, cluster 1 gets 1/3 + 1
    assert result["label"].tolist() == [1, 1, -1]
    np.testing.assert_allclose(result["label_weight"][:2], [2 / 3, 1.0])
    assert np.isnan(result["label_weight"][2])
    blocked = frame_coordinates(3, hand_made_replicates(), REPLICATE_OF, CLASS_OF, COORDS,
                                LABELS, block=1)
    for key, value in result.items():
        np.testing.assert_array_equal(blocked[key], value)


def test_outlier_averages_vote_minus_one():
    reps = [Replicate(0, np.array([0, 1]), np.array([[1.0, 0.0], [0.2, 0.8]]))]
    result = frame_coordinates(2, reps, np.array([0, 0]), np.array([0, 1]),
                               np.array([[0.0], [1.0]]), np.array([0, -1]))
    assert result["label"].tolist() == [0, -1]
    np.testing.assert_allclose(result["coords"][:, 0], [0.0, 0.8])


def test_average_truth_is_occupancy_weighted():
    truth_label = np.array([0, 3, 2])
    truth_t = np.array([0.0, np.nan, 1.0])
    info = average_truth(3, hand_made_replicates(), REPLICATE_OF, CLASS_OF, truth_label, truth_t,
                         5)
    # average 0 (rep0 class 0): frame 0 with 0.5 (cube), frame 1 with 0 -> cube, t = 0
    assert info["majority"][0] == 0 and info["mean_t"][0] == 0.0
    # average 2 (rep1 class 0): frame 0 with 1.0 (cube), frame 1 with 0.6 (dimer)
    np.testing.assert_allclose(info["fractions"][2, [0, 3]], [1 / 1.6, 0.6 / 1.6])
    assert info["mean_t"][2] == 0.0  # the dimer has no t


def test_scores_against_truth():
    truth = np.array([0, 0, 1, 1, 2, 2, 3, 4, 3, 4])
    assert populations(truth).tolist() == [0, 0, -1, -1, 1, 1, 2, 2, 2, 2]
    # melting frames (label 1) are ignored, whatever their cluster
    clusters = np.array([5, 5, 0, 7, 1, 1, 2, 2, 2, 2])
    assert population_ari(clusters, truth)["ari"] == 1.0
    split = np.array([5, 5, 0, 7, 1, 1, 2, 3, 2, 3])
    scored = population_ari(split, truth)
    assert scored["ari"] < 1.0 and scored["contingency"]["contaminant"] == {
        "1": 0, "2": 2, "3": 2, "5": 0}
    # species apart: dimers (3) and rods (4) in clusters of their own is the right answer,
    # and labels of other simulators' contaminants (5, 6, ...) count as contaminants
    assert populations(truth, by_species=True).tolist() == [0, 0, -1, -1, 1, 1, 2, 3, 2, 3]
    assert population_ari(split, truth, by_species=True)["ari"] == 1.0
    assert population_ari(clusters, truth, by_species=True)["ari"] < 1.0
    assert populations(np.array([5, 6]))[0] == 2
    t = np.array([0.0, 0.0, 0.3, 0.6, 1.0, 1.0, np.nan, np.nan, np.nan, np.nan])
    coords = np.column_stack([-np.array([0, 0.1, 0.3, 0.6, 1, 1.1, 9, 9, 9, 9]),
                              np.arange(10.0)])
    rho = melting_spearman(coords, truth, t)
    assert rho["frames"] == 6 and rho["best_component"] == 1
    assert rho["best_abs_rho"] > 0.95 and rho["rho"][0] < 0  # ties in t keep it below 1


def test_size_spearman_scores_each_population_apart():
    """Sizes relative to each shape's own: cubes estimated in order, spheres in reverse, the
    melting frames one without an estimate and two left (too few); contaminants are not
    scored."""
    label = np.array([0, 0, 0, 0, 2, 2, 2, 1, 1, 1, 3, 3])
    truth = np.array([0.95, 1.0, 1.02, 1.05, 0.9, 1.0, 1.1, 0.97, 1.0, 1.03, 1.0, 1.0])
    size = np.array([0.96, 0.99, 1.03, 1.04, 1.05, 1.0, 0.95, np.nan, 1.0, 1.01, 0.9, 1.1])
    scored = size_spearman(size, label, truth)
    assert scored["cube"] == 1.0 and scored["sphere"] == -1.0 and scored["melting"] is None
    assert scored["frames"] == 9


def test_bootstrap_stability_of_identical_replicates():
    rng = np.random.default_rng(0)
    blocks = np.repeat(np.arange(3), 5)
    base = np.where(blocks[:, None] == blocks[None], 0.95, 0.6) + rng.normal(0, 0.01, (15, 15))
    base = (base + base.T) / 2
    cc = np.block([[base, base], [base, base]])
    np.fill_diagonal(cc, 1.0)
    frames = np.arange(40)
    occ = np.zeros((40, 15))
    occ[np.arange(40), rng.integers(0, 15, 40)] = 1.0
    reps = [Replicate(0, frames, occ), Replicate(1, frames, occ)]
    replicate_of = np.repeat([0, 1], 15)
    class_of = np.tile(np.arange(15), 2)
    from spiscape.embed.embedding import embed

    result = replicate_stability(cc, reps, replicate_of, class_of, 40,
                                 lambda c: embed(c, "pca", 2).coords)
    assert result["pairs"]["0-1"]["frames"] == 40
    assert result["mean_disparity"] < 1e-6


def write_landscape_inputs(folder):
    with h5py.File(folder / "averages.h5", "w") as f:
        f["intens"] = np.ones((3, 5, 5), np.float32)
        f["support"] = np.ones((5, 5), bool)
        f["replicate"] = REPLICATE_OF
        f["class"] = CLASS_OF
    with h5py.File(folder / "embedding.h5", "w") as f:
        f["coords"] = COORDS
        f["labels"] = LABELS
        f.attrs["method"] = "pca"
    paths = []
    for rep in hand_made_replicates():
        path = folder / f"rep{rep.number}.h5"
        with h5py.File(path, "w") as f:
            f["frames"] = rep.frames
            f["occupancies"] = rep.occupancies
            f.attrs["params"] = json.dumps({"replicate": rep.number})
        paths.append(str(path))
    return paths


def test_landscape_cli(tmp_path, capsys):
    from spiscape.io.truth import write_truth

    reps = write_landscape_inputs(tmp_path)
    frames = {"label": np.array([0, 2, 3]), "t": np.array([0.0, 1.0, np.nan]),
              "quaternion": np.tile([1.0, 0, 0, 0], (3, 1)), "scale": np.ones(3),
              "size": np.ones(3), "shape_index": np.zeros(3), "photons": np.ones(3),
              "expected_photons": np.ones(3)}
    info = {"label": [0], "t": [0.0], "particle_volume_nm3": [1.0], "exponent": [np.nan]}
    write_truth(tmp_path / "truth.h5", frames, [np.zeros((2, 2, 2))], info,
                {"label_names": json.dumps(["cube", "melting", "sphere", "dimer", "rod"])})
    out = tmp_path / "frames.h5"
    args = ["landscape", "--embedding", str(tmp_path / "embedding.h5"), "--averages",
            str(tmp_path / "averages.h5"), "--replicates", *reps, "--out", str(out)]
    assert cli.main([*args, "--truth", str(tmp_path / "truth.h5"), "--metrics-json",
                     str(tmp_path / "m.json"), "--figure-dir", str(tmp_path / "figs")]) == 0
    data = read_landscape(out)
    np.testing.assert_allclose(data["clpca"][:2], [[1 / 6, 1 / 2], [0, 1]])
    assert data["label"].tolist() == [1, 1, -1]
    assert data["latent"].shape == (3, 1) and np.all(np.isnan(data["latent"]))
    assert data["attrs"]["num_frames"] == 3
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["frames_placed"] == 2 and "population_ari" in metrics
    assert {p.name for p in (tmp_path / "figs").iterdir()} == {
        "frames_clusters.png", "frames_truth.png", "frames_t.png"}
    # the dataset size from --num-frames; too small is an error naming the problem
    assert cli.main([*args, "--num-frames", "5"]) == 0
    assert read_landscape(out)["clpca"].shape == (5, 2)
    capsys.readouterr()
    assert cli.main([*args, "--num-frames", "1"]) == 2
    err = capsys.readouterr().err
    assert "replicates name frame 1" in err and len(err.strip().splitlines()) == 1
    assert cli.main([*args[:-1], str(tmp_path / "x.h5"), "--replicates",
                     str(tmp_path / "averages.h5")]) == 2
    assert "not a classify2d replicate" in capsys.readouterr().err
    # the VAE's per-frame latents go into frames.h5; one of the wrong length is refused
    with h5py.File(tmp_path / "frame_latent.h5", "w") as f:
        f["latent"] = np.array([[0.5], [np.nan], [-1.0]])
    assert cli.main([*args, "--num-frames", "3", "--frame-latent",
                     str(tmp_path / "frame_latent.h5")]) == 0
    got = read_landscape(out)
    np.testing.assert_array_equal(got["latent"][:, 0], np.array([0.5, np.nan, -1.0],
                                                                 dtype=np.float32))
    assert "VAE latent" in got["attrs"]["latent_note"]
    with h5py.File(tmp_path / "frame_latent.h5", "w") as f:
        f["latent"] = np.zeros((2, 1))
    capsys.readouterr()
    assert cli.main([*args, "--num-frames", "3", "--frame-latent",
                     str(tmp_path / "frame_latent.h5")]) == 2
    err = capsys.readouterr().err
    assert "frame_latent.h5" in err and "3 frames" in err


@pytest.fixture
def selectable(tmp_path):
    rng = np.random.default_rng(7)
    photons = SparsePhotons.from_dense(rng.poisson(0.3, (6, 40)))
    path = tmp_path / "photons.h5"
    write_photons(photons, path)
    coords = np.array([[0.0, 0.0], [1.0, 0.5], [0.2, 0.1], [np.nan, np.nan], [0.9, 0.9],
                       [0.1, 0.8]])
    result = {"coords": coords, "label": np.array([0, 1, 0, -1, 1, 0]),
              "num_replicates": np.array([1, 1, 1, 0, 1, 1]), "label_weight": np.ones(6)}
    write_landscape(tmp_path / "frames.h5", result, {})
    return tmp_path, path


def run_select(folder, photons, *choice, out="subset"):
    return cli.main(["select", "--landscape", str(folder / "frames.h5"), "--photons",
                     str(photons), *choice, "--out", str(folder / out)])


@pytest.mark.parametrize("choice, expected", [
    (["--cluster", "0"], [0, 2, 5]),
    (["--cluster", "0", "1"], [0, 1, 2, 4, 5]),
    (["--region", "pc1>0.5"], [1, 4]),
    (["--region", "pc1<=0.2, pc2>=0.1"], [2, 5]),
])
def test_select_writes_exactly_the_chosen_frames(selectable, choice, expected):
    folder, photons = selectable
    assert run_select(folder, photons, *choice) == 0
    subset = folder / "subset"
    lines = (subset / "indices.txt").read_text().splitlines()
    assert lines[0].startswith(f"# {len(expected)} frames of 6")
    assert [int(x) for x in lines if not x.startswith("#")] == expected
    written = read_photons(subset / "photons.h5")
    assert written.equals(read_photons(photons, frames=np.array(expected)))
    assert read_photons(subset / "photons.lst").equals(written)  # the list file works as input


def test_select_refuses_empty_or_bad_selections(selectable, capsys):
    folder, photons = selectable
    capsys.readouterr()
    assert run_select(folder, photons, "--cluster", "7") == 2
    err = capsys.readouterr().err
    assert "holds no frames" in err and len(err.strip().splitlines()) == 1
    assert not (folder / "subset" / "indices.txt").exists()
    assert run_select(folder, photons, "--region", "pc1>5") == 2
    assert "holds no frames" in capsys.readouterr().err
    assert run_select(folder, photons, "--region", "pc1 ~ 3") == 2
    assert "is not like 'pc1>0.1'" in capsys.readouterr().err
    assert run_select(folder, photons, "--region", "pc3>0") == 2
    assert "2 components" in capsys.readouterr().err
    assert run_select(folder, photons, "--region", "z1>0") == 2  # latent is all NaN for now
    assert "holds no frames" in capsys.readouterr().err
    short = folder / "short.h5"
    write_photons(read_photons(photons, frames=np.arange(4)), short)
    assert run_select(folder, short, "--cluster", "0") == 2
    assert "landscape describes 6" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # neither --cluster nor --region
        run_select(folder, photons)
    assert exit_info.value.code == 2


def test_notebook_explores_the_landscape_and_exports_a_subset(selectable, monkeypatch):
    import os
    import sys

    import nbformat

    folder, photons = selectable
    with h5py.File(folder / "frames.h5", "a") as f:
        f.attrs["photons"] = json.dumps([str(photons)])
    assert cli.main(["notebook", str(folder)]) == 0
    notebook = nbformat.read(folder / "analyze.ipynb", as_version=4)
    nbformat.validate(notebook)
    # run its code cells as Jupyter would (headless figures, the venv's spiscape on the PATH)
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}{os.pathsep}"
                               f"{os.environ.get('PATH', '')}")
    namespace = {}
    for cell in notebook.cells:
        if cell.cell_type == "code":
            exec(compile(cell.source, "analyze.ipynb", "exec"), namespace)  # noqa: S102
    assert namespace["chosen"].tolist() == [1, 2, 4, 5]  # pc1 > 0, placed
    lines = (folder / "subset" / "indices.txt").read_text().splitlines()
    assert [int(x) for x in lines if not x.startswith("#")] == [1, 2, 4, 5]
