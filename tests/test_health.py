"""The run's health table: values read from stage outputs, warnings at the documented limits."""

from __future__ import annotations

import json

import h5py
import numpy as np

from spiscape import cli
from spiscape.qc import health


def fake_results(folder, *, last_rms=0.01, class_frames=(50, 40, 30, 20), placed=0.95,
                 selected=(True, True, True, False), volumes_differ=True, phasing_failed=False,
                 disparity=0.05, volume_jumps=False):
    (folder / "classify2d").mkdir(parents=True)
    log = np.array([(1, 0.1, 0.5), (2, 0.1, last_rms)],
                   dtype=[("iteration", "i4"), ("seconds", "f8"), ("rms_change", "f8")])
    occ = np.zeros((sum(class_frames), len(class_frames)))
    row = 0
    for c, n in enumerate(class_frames):
        occ[row:row + n, c] = 1.0
        row += n
    with h5py.File(folder / "classify2d/rep0.h5", "w") as f:
        f["log"] = log
        f["occupancies"] = occ
        f["frames"] = np.arange(occ.shape[0])
        for key in ("best_class", "best_rotation"):
            f[key] = np.zeros(occ.shape[0], np.int32)
        f["angles"] = np.zeros(4)
        f["model_pixels"] = np.arange(4)
    label = np.where(np.arange(100) < placed * 100, 0, -1)
    with h5py.File(folder / "frames.h5", "w") as f:
        f["label"] = label
        f["clpca"] = np.zeros((label.size, 2))
    with h5py.File(folder / "embedding.h5", "w") as f:
        f["coords"] = np.zeros((4, 2))
        f["labels"] = np.zeros(4, dtype=np.int64)
        f.attrs["metrics"] = json.dumps({"stability": {"mean_disparity": disparity}})
        f.attrs["num_clusters"] = 1
    (folder / "vae").mkdir()
    with h5py.File(folder / "vae/latent.h5", "w") as f:
        f["selected"] = np.array(selected)
        f["mu"] = f["logvar"] = np.zeros((len(selected), 1))
    with h5py.File(folder / "averages.h5", "w") as f:
        f["frames"] = np.array([40.0, 30.0, 20.0, 10.0])
        f["intens"] = np.ones((4, 5, 5))
        f["replicate"] = np.zeros(4, dtype=np.int64)
        f["support"] = np.ones((5, 5), dtype=bool)
    with h5py.File(folder / "orientation.h5", "w") as f:
        f["cc"] = np.array([0.8, 0.7, 0.9, 0.2])
        f["quaternion"] = np.tile([1.0, 0.0, 0.0, 0.0], (4, 1))
    grid = np.indices((11, 11, 11)) - 5
    r = np.sqrt((grid ** 2).sum(0)) + 1.0
    one = r ** -4.0
    other = one * (1 + 0.5 * np.cos(r)) ** 2 if volumes_differ else one
    with h5py.File(folder / "vae/volumes.h5", "w") as f:
        f["intens"] = np.stack([one, (one + other) / 2, other])
    with h5py.File(folder / "phasing.h5", "w") as f:
        f["converged"] = np.array([True] * 9 + [not phasing_failed])
        f["volume"] = np.linspace(1.0, 1.1, 10) * (np.linspace(1, 10, 10) if volume_jumps else 1)


def statuses(rows):
    return {r["check"]: r["status"] for r in rows}


def test_a_healthy_run_has_no_warning(tmp_path):
    fake_results(tmp_path)
    rows = health.dataset_health(tmp_path)
    assert statuses(rows) == dict.fromkeys(health.THRESHOLDS, "ok")
    values = {r["check"]: r["value"] for r in rows}
    assert values["frames_placed"] == 0.95
    assert values["landscape_shared"] == 0.95
    assert values["vae_frames"] == 0.9  # 90 of 100 averaged frames
    assert values["orientation_cc"] == 0.8  # median of the selected averages
    assert values["emc_live_classes"] == 1.0


def test_each_failure_mode_warns(tmp_path):
    fake_results(tmp_path, last_rms=0.2, class_frames=(180, 2, 1, 1), placed=0.5,
                 selected=(False, False, True, True), volumes_differ=False, disparity=0.3,
                 volume_jumps=True)
    with h5py.File(tmp_path / "phasing.h5", "a") as f:
        del f["converged"]
        f["converged"] = np.array([True, False, False, True, False, True, True, True, False,
                                   False])
    got = statuses(health.dataset_health(tmp_path))
    assert got == dict.fromkeys(health.THRESHOLDS, "warn")


def test_missing_stages_are_not_applicable(tmp_path):
    rows = health.dataset_health(tmp_path)
    assert {r["status"] for r in rows} == {"n/a"} and not health.warnings(rows)


def test_summarize_writes_health_and_warns(tmp_path, capsys):
    fake_results(tmp_path / "bad", placed=0.3)
    fake_results(tmp_path / "good")
    code = cli.main(["summarize", "--results", str(tmp_path), "--datasets", "bad", "good",
                     "--out", str(tmp_path / "summary.tsv"), "--health",
                     str(tmp_path / "health.tsv")])
    assert code == 0
    summary = (tmp_path / "summary.tsv").read_text().splitlines()
    column = summary[0].split("\t").index("health")
    assert summary[1].split("\t")[column] == "warn: frames_placed"
    assert summary[2].split("\t")[column] == "ok"
    table = (tmp_path / "health.tsv").read_text().splitlines()
    assert table[0].split("\t") == ["dataset", *health.COLUMNS]
    assert len(table) == 1 + 2 * len(health.THRESHOLDS)
    err = capsys.readouterr().err
    assert any("bad: frames_placed" in line and "do not trust" in line
               for line in err.splitlines())
