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


def build_reference(photons, detector, out, num_classes: int = 6):
    """A results folder made by the CLI stages: 2 replicates of ``num_classes`` classes,
    averages, common lines, embedding and the batch landscape of ``photons`` (also used by
    bench/place_outliers.py)."""
    data = ["--photons", str(photons)]
    det = ["--detector", str(detector)]
    reps = []
    for r in range(2):
        rep = out / "classify2d" / f"rep{r}.h5"
        assert cli.main(["classify2d", *data, *det, "--out", str(rep), "--replicate", str(r),
                         "--fraction", "0.8", "--num-classes", str(num_classes), "--num-rot", "12",
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


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    return build_reference(tiny_dataset / "photons.h5", tiny_dataset / "detector.h5",
                           tmp_path_factory.mktemp("reference"))


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


def test_frames_of_a_species_the_reference_lacks_are_flagged_as_outliers(tiny_dataset,
                                                                         tmp_path_factory):
    """A landscape built from cubes and spheres; the tiny dataset's cubes and rods placed on it:
    the rods (a species the reference never saw) are flagged, the cubes mostly not, and the
    flagged share of the reference's own frames is about 1 - the calibration quantile."""
    from spiscape.io.truth import read_truth
    from spiscape.simulate.run import SimulationParams, simulate_dataset

    root = tmp_path_factory.mktemp("no_rods")
    simulate_dataset(SimulationParams(num_frames=400, seed=9, mean_photons=1500, binning=6,
                                      grid_size=48, fractions={"cube": 0.5, "sphere": 0.5},
                                      chunk_frames=200), root / "data")
    reference = build_reference(root / "data" / "photons.h5", root / "data" / "detector.h5",
                                root / "results")
    out = root / "placed.h5"
    assert cli.main(["place", "--reference", str(reference), "--photons",
                     str(tiny_dataset / "photons.h5"), "--detector",
                     str(tiny_dataset / "detector.h5"), "--out", str(out),
                     "--figure", str(root / "placed.png")]) == 0
    placed = read_placed(out)
    truth = read_truth(tiny_dataset / "truth.h5", volumes=False)
    rod = np.asarray(truth.label) == truth.label_names.index("rod")
    assert np.isfinite(placed["attrs"]["outlier_threshold"])
    print("outlier share: rods", placed["outlier"][rod].mean(), "cubes",
          placed["outlier"][~rod].mean())
    assert placed["outlier"][rod].mean() >= 0.6, placed["outlier"][rod].mean()
    assert placed["outlier"][~rod].mean() <= 0.1, placed["outlier"][~rod].mean()
    # a cube's misfit is small (what the class averages blur away), a rod's several times more
    assert np.median(placed["misfit"][rod]) > 3 * np.median(placed["misfit"][~rod])
    own = root / "own.h5"
    assert cli.main(["place", "--reference", str(reference), "--photons",
                     str(root / "data" / "photons.h5"), "--detector",
                     str(root / "data" / "detector.h5"), "--out", str(own)]) == 0
    assert read_placed(own)["outlier"].mean() <= 0.03


def test_misfit_is_chi_square_divergence_of_the_binned_photons():
    """Frames drawn from a view have misfit ~0 at any photon count; frames drawn from another
    distribution have misfit near its χ² divergence from the view over the bins."""
    from spiscape.embed.place import misfit, misfit_bins

    rng = np.random.default_rng(0)
    view = rng.gamma(0.5, size=(400, 1))
    view /= view.sum()
    bins, share = misfit_bins(view)
    assert bins.shape == (400, 1) and abs(share.sum() - 1) < 1e-12
    for photons in (200, 3000):
        own = rng.multinomial(photons, view[:, 0], size=2000)
        m = misfit(own, np.zeros(2000, int), bins, share)
        assert abs(m.mean()) < 3 * m.std() / np.sqrt(2000)
    other = np.roll(view[:, 0], 1)
    frames = rng.multinomial(3000, other, size=500)
    b = bins[:, 0]
    q = np.bincount(b, weights=other, minlength=share.shape[1])
    divergence = np.sum((q - share[0]) ** 2 / share[0])
    m = misfit(frames, np.zeros(500, int), bins, share)
    assert abs(m.mean() - divergence) < 0.05 * divergence + 3 * m.std() / np.sqrt(500)


def test_place_refuses_a_folder_without_a_landscape(tiny_dataset, tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["place", "--reference", str(tmp_path), "--photons",
                     str(tiny_dataset / "photons.h5"), "--detector",
                     str(tiny_dataset / "detector.h5"), "--out", str(tmp_path / "p.h5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "averages.h5: no such file" in err
    assert not (tmp_path / "p.h5").exists()


def test_follow_places_frames_as_files_arrive_stops_on_sigterm_and_resumes(reference,
                                                                          tiny_dataset, tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    from spiscape.io import read_photons, write_photons

    photons = read_photons(tiny_dataset / "photons.h5")
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    write_photons(photons.select(np.arange(0, 100)), incoming / "a.h5")
    out = tmp_path / "live" / "placed.h5"
    cmd = [sys.executable, "-m", "spiscape", "place", "--reference", str(reference),
           "--photons", str(incoming), "--detector", str(tiny_dataset / "detector.h5"),
           "--out", str(out), "--follow", "--poll-seconds", "0.2", "--block-frames", "40",
           "--figure", str(tmp_path / "live" / "placed.png")]

    def placed_frames():
        try:
            return len(read_placed(out)["label"])
        except Exception:  # not written yet
            return 0

    def wait_for(count, proc):
        deadline = time.time() + 60
        while placed_frames() < count and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert placed_frames() == count

    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    wait_for(100, proc)
    # a file moved in complete, as a DAQ writer would: placed, and appended after the first
    write_photons(photons.select(np.arange(100, 180)), tmp_path / "b.h5")
    (tmp_path / "b.h5").rename(incoming / "b.h5")
    wait_for(180, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    summary = json.loads((out.parent / "placed.summary.json").read_text())
    page = (out.parent / "placed.summary.html").read_text()
    assert "180 frames placed" in page and 'http-equiv="refresh"' in page
    assert 'src="placed.png"' in page and (out.parent / "placed.png").stat().st_size > 1000
    assert summary["frames"] == 180 and abs(sum(summary["cluster_fractions"].values()) - 1) < 1e-3
    # resumed: only the new file's frames are placed, after the others, in the files' order
    write_photons(photons.select(np.arange(180, 240)), incoming / "c.h5")
    assert subprocess.run([*cmd, "--max-idle-seconds", "1"], capture_output=True,
                          timeout=120).returncode == 0
    live = read_placed(out)
    assert len(live["label"]) == 240
    batch = tmp_path / "batch.h5"
    assert cli.main(["place", "--reference", str(reference), "--photons",
                     str(tiny_dataset / "photons.h5"), "--detector",
                     str(tiny_dataset / "detector.h5"), "--out", str(batch)]) == 0
    np.testing.assert_array_equal(live["label"], read_placed(batch)["label"])
    # the same up to single precision: the likelihood's float32 products sum the frames of a
    # file and of the whole set in other orders (2e-6 on a coordinate of 0.05 seen under load)
    np.testing.assert_allclose(live["clpca"], read_placed(batch)["clpca"], rtol=1e-5, atol=1e-5)


def test_place_refuses_a_detector_the_reference_was_not_made_with(reference, tiny_dataset,
                                                                   tmp_path, capsys):
    from spiscape.io import Detector, SparsePhotons, read_detector, write_detector, write_photons

    own = read_detector(tiny_dataset / "detector.h5")
    n = 30
    write_photons(SparsePhotons.from_dense(np.ones((3, n), int)), tmp_path / "p.h5")
    cases = (  # another distance; the same geometry with pixels far beyond the averages' grid
        (100.0, 100.0, 1.0, "detd 100 differs from the reference's"),
        (own.detd, own.ewald_rad, 0.5 * own.ewald_rad, "its pixels reach beyond"),
    )
    for k, (detd, ewald, reach, message) in enumerate(cases):
        det = tmp_path / f"other{k}.h5"
        write_detector(Detector(qx=np.linspace(-reach, reach, n), qy=np.zeros(n),
                                qz=np.zeros(n), corr=np.ones(n), mask=np.zeros(n, np.uint8),
                                detd=detd, ewald_rad=ewald), det)
        capsys.readouterr()
        assert cli.main(["place", "--reference", str(reference), "--photons",
                         str(tmp_path / "p.h5"), "--detector", str(det),
                         "--out", str(tmp_path / "placed.h5")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"other{k}.h5: {message}" in err, err
        assert not (tmp_path / "placed.h5").exists()
