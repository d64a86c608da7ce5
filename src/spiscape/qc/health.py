"""Health of a finished run: the few numbers that say whether to trust it, and warnings.

Read from the stage outputs of one dataset (``results/{ds}/``), no ground truth needed. Each
check is a row ``check, value, threshold, status, meaning``; ``status`` is ``ok``, ``warn``
or ``n/a`` (the stage has not run). The thresholds are not tuned to a dataset: each marks a
state in which a later stage is known to go wrong (the validation matrix, docs/validation.md).

================  =====================================================  ==========
check             value                                                  warn when
================  =====================================================  ==========
emc_converged     largest relative rms change of the models over the     > 0.05
                  last iteration of each replicate
emc_live_classes  share of the EMC classes holding >= 10 % of their fair < 0.5
                  share of the frames (the rest starved: annealing
                  collapsed onto a few classes)
frames_placed     share of the frames with a cluster in the landscape    < 0.8
landscape_shared  1 - Procrustes disparity of the bootstrap replicates'  < 0.8
                  landscapes, each embedded alone, over the frames both
                  placed: the share of the landscape's variance that
                  two classifications of the same data agree on
vae_frames        share of the averaged frames whose averages the VAE    < 0.5
                  trained on (the rest: clusters left out as
                  contaminants)
volume_spread     1 - smallest CC (log intensity, measured shells)       < 0.01
                  between the decoded volumes at the ends of the
                  latent and the others: ~0 means the latent decodes
                  one shape
orientation_cc    median CC of the averages the VAE trained on with      < 0.6
                  their best reference slice (a poor match: wrong
                  reference or size_nm)
phasing           share of the volume curve's points whose phasing       < 0.8
                  converged (starts agree, support error not an
                  outlier of the curve's, or an outlier that an
                  independent phasing reproduces)
volume_range      largest / smallest phased volume along the curve       > 2
                  (converged points): a continuous latent does not
                  double a particle's volume (on the validation matrix
                  it caught df64's +917 % ratio, which no other check
                  did)
================  =====================================================  ==========
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np

from spiscape.io.averages import read_averages
from spiscape.io.embedding import read_embedding
from spiscape.io.frames import read_landscape
from spiscape.io.orientation import read_orientation
from spiscape.io.phasing import read_converged, read_phased_volumes
from spiscape.io.replicate import read_replicate, replicate_files
from spiscape.io.volumes import read_latent, read_volumes
from spiscape.phasing.align import centred_radius
from spiscape.utils.atomic import atomic_path

log = logging.getLogger(__name__)

COLUMNS = ("check", "value", "threshold", "status", "meaning")

#: (threshold, True when a value *below* it warns)
THRESHOLDS = {
    "emc_converged": (0.05, False),
    "emc_live_classes": (0.5, True),
    "frames_placed": (0.8, True),
    "landscape_shared": (0.8, True),
    "vae_frames": (0.5, True),
    "volume_spread": (0.01, True),
    "orientation_cc": (0.6, True),
    "phasing": (0.8, True),
    "volume_range": (2.0, False),
}
MEANING = {
    "emc_converged": "largest relative rms change of the EMC models in the last iteration",
    "emc_live_classes": "share of EMC classes holding >= 10 % of their fair share of frames",
    "frames_placed": "share of frames placed in a cluster of the landscape",
    "landscape_shared": "share of the landscape's variance the bootstrap replicates agree on",
    "vae_frames": "share of the averaged frames whose averages the VAE trained on",
    "volume_spread": "1 - smallest log-intensity CC between decoded volumes along the latent",
    "orientation_cc": "median CC of the VAE's averages with their best reference slice",
    "phasing": "share of the volume curve's points whose phasing converged",
    "volume_range": "largest / smallest phased volume along the latent (converged points)",
}


def _status(check: str, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    threshold, below = THRESHOLDS[check]
    bad = value < threshold if below else value > threshold
    return "warn" if bad else "ok"


def emc_checks(folder: Path) -> dict:
    reps = replicate_files(folder)
    if not reps:
        return {}
    change, live = [], []
    for path in reps:
        rep = read_replicate(path, models=False, details=True)
        change.append(float(rep.log["rms_change"][-1]))
        frames = rep.occupancies.sum(axis=0)
        fair = frames.sum() / frames.size
        live.append(float(np.mean(frames >= 0.1 * fair)))
    return {"emc_converged": max(change), "emc_live_classes": min(live)}


def landscape_checks(folder: Path) -> dict:
    path = folder / "frames.h5"
    if not path.exists():
        return {}
    label = read_landscape(path)["label"]
    out = {"frames_placed": float(np.mean(label >= 0)) if label.size else float("nan")}
    if (folder / "embedding.h5").exists():
        metrics = json.loads(read_embedding(folder / "embedding.h5").attrs.get("metrics", "{}"))
        disparity = (metrics.get("stability") or {}).get("mean_disparity")
        if disparity is not None:
            out["landscape_shared"] = 1.0 - float(disparity)
    return out


def log_intensity_cc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    floor = 1e-3 * max(float(np.median(a[mask])), float(np.median(b[mask])), 1e-30)
    x, y = np.log(a[mask] + floor), np.log(b[mask] + floor)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / max(np.sqrt((x * x).sum() * (y * y).sum()), 1e-30))


def vae_checks(folder: Path) -> dict:
    out = {}
    latent, averages = folder / "vae/latent.h5", folder / "averages.h5"
    if latent.exists() and averages.exists():
        selected = read_latent(latent)["selected"]
        frames = read_averages(averages, with_intens=False).frames
        frames = np.where(np.isfinite(frames) & (frames > 0), frames, 0.0)
        if frames.sum() > 0 and frames.shape == selected.shape:
            out["vae_frames"] = float(frames[selected].sum() / frames.sum())
        orientation = folder / "orientation.h5"
        if orientation.exists():
            cc = read_orientation(orientation).cc
            if cc.shape == selected.shape and selected.any():
                out["orientation_cc"] = float(np.nanmedian(cc[selected]))
    volumes = folder / "vae/volumes.h5"
    if volumes.exists():
        intens = read_volumes(volumes).intens
        if intens.shape[0] >= 2:
            radius = centred_radius(intens.shape[1:])
            # the shells every decoded volume is constrained on: outside the beamstop, inside
            # the largest sphere of the grid
            mask = (radius >= 3) & (radius <= intens.shape[1] // 2)
            ccs = [log_intensity_cc(intens[i], intens[j], mask)
                   for i in (0, intens.shape[0] - 1) for j in range(intens.shape[0]) if i != j]
            out["volume_spread"] = 1.0 - min(ccs)
    return out


def phasing_checks(folder: Path) -> dict:
    path = folder / "phasing.h5"
    if not path.exists():
        return {}
    converged = read_converged(path)
    out = {} if converged is None or not converged.size else {
        "phasing": float(np.mean(converged))}
    phased = read_phased_volumes(path)
    if phased is not None:
        volume, ok = phased
        ok &= np.isfinite(volume) & (volume > 0)
        if ok.sum() >= 2:
            out["volume_range"] = float(volume[ok].max() / volume[ok].min())
    return out


def dataset_health(folder: Path) -> list[dict]:
    """The health rows of one dataset's results folder (n/a where a stage has not run)."""
    values = {**emc_checks(folder), **landscape_checks(folder), **vae_checks(folder),
              **phasing_checks(folder)}
    rows = []
    for check in THRESHOLDS:
        value = values.get(check)
        rows.append({"check": check, "value": None if value is None else round(value, 4),
                     "threshold": THRESHOLDS[check][0], "status": _status(check, value),
                     "meaning": MEANING[check]})
    return rows


def warnings(rows: list[dict]) -> list[str]:
    return [r["check"] for r in rows if r["status"] == "warn"]


def log_health(name: str, rows: list[dict]) -> None:
    for r in rows:
        if r["status"] == "warn":
            below = "below" if THRESHOLDS[r["check"]][1] else "above"
            log.warning("%s: %s = %s is %s %s (%s): do not trust the result without a look",
                        name, r["check"], r["value"], below, r["threshold"], r["meaning"])
    log.info("%s health: %s", name, ", ".join(f"{r['check']} {r['value']} {r['status']}"
                                               for r in rows))


def write_health(rows_by_dataset: dict[str, list[dict]], path: Path) -> None:
    """One TSV: a row per dataset and check."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=("dataset", *COLUMNS), delimiter="\t")
        writer.writeheader()
        for name, rows in rows_by_dataset.items():
            for r in rows:
                writer.writerow({"dataset": name, **{k: "" if r[k] is None else r[k]
                                                     for k in COLUMNS}})
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(rows_by_dataset, indent=1) + "\n")
