"""spiscape place: frames placed on a fixed landscape agree with the batch landscape they were
built into (issue 18's first bar), and bad inputs are refused."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from scipy.stats import spearmanr

from spiscape import cli
from spiscape.io.frames import read_landscape
from spiscape.io.placed import read_placed


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    data = ["--photons", str(tiny_dataset / "photons.h5")]
    det = ["--detector", str(tiny_dataset / "detector.h5")]
    reps = []
    for r in range(2):
        rep = out / "classify2d" / f"rep{r}.h5"
        assert cli.main(["classify2d", *data, *det, "--out", str(rep), "--replicate", str(r),
                         "--fraction", "0.8", "--num-classes", "6", "--num-rot", "12",
                         "--friedel", "--iterations", "12", "--seed", "3"]) == 0
        reps.append(str(rep))
    steps = [
        ["averages", "--replicates", *reps, "--out", str(out / "averages.h5"),
         "--min-frames", "2"],
        ["commonlines", "--averages", str(out / "averages.h5"), "--out",
         str(out / "commonlines.h5")],
        ["embed", "--commonlines", str(out / "commonlines.h5"), "--averages",
         str(out / "averages.h5"), "--out", str(out / "embedding.h5"), "--components", "2"],
        ["landscape", "--embedding", str(out / "embedding.h5"), "--averages",
         str(out / "averages.h5"), "--replicates", *reps, *data, "--out",
         str(out / "frames.h5")],
    ]
    for step in steps:
        assert cli.main(step) == 0, step
    return out


def test_placing_the_reference_frames_agrees_with_the_batch_landscape(reference, tiny_dataset,
                                                                      tmp_path):
    out = tmp_path / "placed.h5"
    assert cli.main(["place", "--reference", str(reference), "--photons",
                     str(tiny_dataset / "photons.h5"), "--detector",
                     str(tiny_dataset / "detector.h5"), "--out", str(out),
                     "--block-frames", "100"]) == 0
    placed, batch = read_placed(out), read_landscape(reference / "frames.h5")
    with h5py.File(reference / "frames.h5") as f:
        drawn = f["num_replicates"][()]
    both = batch["label"] >= 0
    assert both.mean() > 0.9
    agree = np.mean(placed["label"][both] == batch["label"][both])
    assert agree >= 0.98, agree
    # the batch landscape averages the replicates that drew a frame, placement all of them: on
    # the frames every replicate drew the two are the same computation
    every = both & (drawn == drawn.max())
    assert every.sum() > 100
    for k in range(batch["clpca"].shape[1]):
        rho = spearmanr(placed["clpca"][every, k], batch["clpca"][every, k])[0]
        assert rho >= 0.98, (k, rho)
        r = np.corrcoef(placed["clpca"][both, k], batch["clpca"][both, k])[0, 1]
        assert r >= 0.9, (k, r)  # the others: one replicate's view against both
    assert np.all(placed["probability"] > 0) and np.all(placed["scale"] > 0)
    assert np.all(np.isfinite(placed["loglik_per_photon"]))


def test_place_refuses_a_folder_without_a_landscape(tiny_dataset, tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["place", "--reference", str(tmp_path), "--photons",
                     str(tiny_dataset / "photons.h5"), "--detector",
                     str(tiny_dataset / "detector.h5"), "--out", str(tmp_path / "p.h5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "averages.h5: no such file" in err
    assert not (tmp_path / "p.h5").exists()
