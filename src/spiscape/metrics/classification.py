"""How well EMC 2D classification recovers the simulated populations and their slices."""

from __future__ import annotations

import json

import h5py
import numpy as np

from spiscape.emc import geometry, kernels
from spiscape.io import Detector
from spiscape.io.replicate import read_replicate
from spiscape.simulate.frames import quaternion_to_matrix, slice_volume


def majority_labels(classes: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The most frequent true label among each class's frames (-1 for an empty class)."""
    top = np.full(num_classes, -1)
    for m in range(num_classes):
        members = labels[classes == m]
        if members.size:
            top[m] = np.bincount(members).argmax()
    return top


def purity_by_population(classes, labels, num_classes: int, names) -> dict[str, float]:
    """Per population: the fraction of its frames whose class's majority label is its own.

    Each frame is counted under the majority label of the class it was assigned to (its most
    probable class), as in the EMC issue's definition of class purity.
    """
    assigned = majority_labels(classes, labels, num_classes)[classes]
    scores = {}
    for label, name in enumerate(names):
        members = labels == label
        if members.any():
            scores[name] = float(np.mean(assigned[members] == label))
    return scores


def truth_class_averages(rep: dict, truth, detector: Detector, members_of) -> dict[int, np.ndarray]:
    """The noiseless counterpart of each class average: the true slices of its frames, rotated
    in-plane by each frame's best rotation and merged on the class grid exactly as EMC merges.

    ``rep`` holds the replicate's ``frames``, ``best_rotation``, ``angles`` and ``size``;
    ``members_of[m]`` the positions (in the replicate) of class m's frames. Slices exclude the
    fluence (the EMC model is the intensity at scale 1) and include the detector's corr.
    """
    size = rep["size"]
    used = np.flatnonzero(detector.mask == 0)
    cx, cy = geometry.pixel_coords_2d(detector)
    table = geometry.rotation_table(cx[used], cy[used], rep["angles"], size)
    operator = kernels.view_operator(table.index, table.weight, size)
    q = np.stack([detector.qx[used], detector.qy[used], detector.qz[used]])
    num_rot = rep["angles"].size
    volumes = truth["volumes/intens"]
    averages = {}
    for m, members in members_of.items():
        frames = rep["frames"][members]
        rot = rep["best_rotation"][members]
        num = np.zeros((1, num_rot, used.size))
        den = np.zeros((1, num_rot, used.size))
        shape_index = truth["shape_index"][:][frames]
        for k in np.unique(shape_index):
            sel = shape_index == k
            sizes = truth["size"][:][frames[sel]]
            slices = slice_volume(
                volumes[k], q, quaternion_to_matrix(truth["quaternion"][:][frames[sel]]), sizes
            )
            slices *= sizes[:, None] ** 6 * detector.corr[used][None, :]
            np.add.at(num[0], rot[sel], slices)
            np.add.at(den[0], rot[sel], 1.0)
        grid_num = kernels.merge(num, operator)[0]
        grid_den = kernels.merge(den, operator)[0]
        ratio = np.where(grid_den > 1e-6, grid_num / np.maximum(grid_den, 1e-12), np.nan)
        averages[m] = ratio.reshape(size, size)
    return averages


def score_replicate(rep_path, truth_path, detector: Detector, min_purity: float = 0.9,
                    min_frames: int = 10) -> dict:
    """Purity by population and, for pure classes, the CC of the average with the truth."""
    stored = read_replicate(rep_path, details=True)
    rep = {"frames": stored.frames, "best_rotation": stored.best_rotation,
           "angles": stored.angles, "size": int(stored.intens.shape[1]),
           "intens": stored.intens, "classes": stored.occupancies.argmax(axis=1)}
    with h5py.File(truth_path, "r") as truth:
        names = json.loads(truth.attrs["label_names"])
        labels = truth["label"][:][rep["frames"]].astype(np.int64)
        num_classes = rep["intens"].shape[0]
        purity = purity_by_population(rep["classes"], labels, num_classes, names)
        pure = {}
        for m in range(num_classes):
            members = np.flatnonzero(rep["classes"] == m)
            if members.size >= min_frames:
                share = np.bincount(labels[members]).max() / members.size
                if share >= min_purity:
                    pure[m] = members
        truth_avg = truth_class_averages(rep, truth, detector, pure)
    cc, log_cc = {}, {}
    for m, reference in truth_avg.items():
        model = rep["intens"][m]
        ok = np.isfinite(reference) & (model > 0) & (reference > 0)
        cc[m] = float(np.corrcoef(model[ok], reference[ok])[0, 1])
        # the linear CC is dominated by the central speckle; the CC of log intensities weighs
        # every speckle ring alike and is the stricter test of the high-q structure
        log_cc[m] = float(np.corrcoef(np.log(model[ok]), np.log(reference[ok]))[0, 1])
    label_of = {m: names[int(np.bincount(labels[pure[m]]).argmax())] for m in pure}
    return {
        "purity": purity,
        "pure_classes": len(pure),
        "class_cc": {int(m): v for m, v in cc.items()},
        "class_label": {int(m): v for m, v in label_of.items()},
        "class_cc_median": float(np.median(list(cc.values()))) if cc else float("nan"),
        "class_cc_min": float(min(cc.values())) if cc else float("nan"),
        "class_log_cc": {int(m): v for m, v in log_cc.items()},
        "class_log_cc_median": float(np.median(list(log_cc.values()))) if cc else float("nan"),
        "class_log_cc_min": float(min(log_cc.values())) if cc else float("nan"),
    }
