"""The per-frame landscape: embedding coordinates and cluster of every frame from its classes.

A frame belongs to the classes of a replicate with its EMC occupancies (probabilities summing to
one). Its position in the landscape is the occupancy-weighted mean of the coordinates of those
classes' averages, and its cluster the occupancy-weighted vote of their clusters. Classes left out
of ``averages.h5`` (too few frames) have no coordinates: the weights are renormalised over the
kept classes, and a frame whose weight falls entirely on dropped classes gets nothing from that
replicate. Each bootstrap replicate places the frames it drew; a frame's final coordinates are the
mean over the replicates that placed it, its cluster the vote summed over them (each replicate's
vote normalised to one). Frames that no replicate placed keep NaN coordinates and label -1.

The file, ``frames.h5``, is :mod:`spiscape.io.frames`.
"""

from __future__ import annotations

import numpy as np

from spiscape.errors import ConfigError, InputError
from spiscape.io.replicate import Replicate


def kept_classes(rep: Replicate, replicate_of, class_of) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, classes)``: the averages.h5 rows of this replicate and their class numbers."""
    rows = np.flatnonzero(np.asarray(replicate_of) == rep.number)
    classes = np.asarray(class_of)[rows]
    if classes.size and (classes.min() < 0 or classes.max() >= rep.occupancies.shape[1]):
        raise InputError(rep.path, f"averages name class {classes.max()} but the replicate has "
                                   f"{rep.occupancies.shape[1]} classes")
    return rows, classes


def class_weights(occupancies: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Occupancies restricted to the kept classes, rows renormalised (all-zero when none kept)."""
    weights = np.asarray(occupancies[:, classes], dtype=np.float64)
    total = weights.sum(axis=1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)


def frame_coordinates(num_frames: int, reps: list[Replicate], replicate_of, class_of,
                      coords: np.ndarray, labels: np.ndarray | None = None,
                      block: int = 262144) -> dict:
    """Per-frame coordinates ``(N, k)``, labels ``(N,)`` and counts from the averages' ones.

    ``replicate_of``, ``class_of``: averages.h5's ``replicate`` and ``class``; ``coords (A, k)``
    and ``labels (A,)`` of the averages (labels -1 are outliers). Frames are taken ``block`` at a
    time, so that memory stays at the size of the inputs.
    """
    coords = np.asarray(coords, dtype=np.float64)
    total = np.zeros((num_frames, coords.shape[1]))
    placed = np.zeros(num_frames, dtype=np.int32)
    num_labels = int(labels.max()) + 1 if labels is not None and labels.size else 0
    votes = np.zeros((num_frames, num_labels + 1))  # last column: outliers
    for rep in reps:
        if rep.frames.size and (rep.frames.min() < 0 or rep.frames.max() >= num_frames):
            raise InputError(rep.path, f"frame index {rep.frames.max()} is outside the dataset "
                                       f"of {num_frames} frames")
        rows, classes = kept_classes(rep, replicate_of, class_of)
        if labels is not None:
            lab = np.asarray(labels)[rows]
            onehot = np.zeros((rows.size, num_labels + 1))
            onehot[np.arange(rows.size), np.where(lab >= 0, lab, num_labels)] = 1.0
        for start in range(0, rep.frames.size, block):
            weights = class_weights(rep.occupancies[start:start + block], classes)
            here = weights.sum(axis=1) > 0
            frames = rep.frames[start:start + block][here]
            w = weights[here]
            total[frames] += w @ coords[rows]
            placed[frames] += 1
            if labels is not None:
                votes[frames] += w @ onehot
    out = np.full_like(total, np.nan)
    seen = placed > 0
    out[seen] = total[seen] / placed[seen, None]
    result = {"coords": out, "num_replicates": placed}
    if labels is not None:
        winner = votes.argmax(axis=1)
        vote_total = votes.sum(axis=1)
        share = np.divide(votes.max(axis=1), vote_total, out=np.full(num_frames, np.nan),
                          where=vote_total > 0)
        label = np.where(seen & (winner < num_labels), winner, -1).astype(np.int64)
        result.update(label=label, label_weight=share)
    return result


def average_truth(num_averages: int, reps: list[Replicate], replicate_of, class_of,
                  truth_label: np.ndarray, truth_t: np.ndarray, num_labels: int) -> dict:
    """Each average's truth from its frames: occupancy-weighted label shares, majority, mean t.

    ``mean_t`` is weighted over the frames with a defined t (contaminants have NaN); NaN when
    none. ``fractions (A, L)`` are the occupancy-weighted shares of each true label.
    """
    fractions = np.zeros((num_averages, num_labels))
    t_sum = np.zeros(num_averages)
    t_weight = np.zeros(num_averages)
    for rep in reps:
        rows = np.flatnonzero(np.asarray(replicate_of) == rep.number)
        occ = rep.occupancies[:, np.asarray(class_of)[rows]]  # raw weights, (n, a)
        lab = np.asarray(truth_label)[rep.frames].astype(np.int64)
        onehot = np.zeros((lab.size, num_labels))
        onehot[np.arange(lab.size), lab] = 1.0
        fractions[rows] += occ.T @ onehot
        t = np.asarray(truth_t, dtype=np.float64)[rep.frames]
        finite = np.isfinite(t)
        t_sum[rows] += occ[finite].T @ t[finite]
        t_weight[rows] += occ[finite].sum(axis=0)
    norm = fractions.sum(axis=1, keepdims=True)
    fractions = np.divide(fractions, norm, out=np.zeros_like(fractions), where=norm > 0)
    majority = np.where(norm[:, 0] > 0, fractions.argmax(axis=1), -1)
    mean_t = np.divide(t_sum, t_weight, out=np.full(num_averages, np.nan), where=t_weight > 0)
    return {"fractions": fractions, "majority": majority, "mean_t": mean_t}


def replicate_stability(cc: np.ndarray, reps: list[Replicate], replicate_of, class_of,
                        num_frames: int, embed_fn) -> dict:
    """Bootstrap stability: Procrustes disparity between replicates' separate embeddings.

    Each replicate's averages are embedded on their own (``embed_fn(cc_sub) -> coords``), placed
    on their frames as in :func:`frame_coordinates`, and every pair of replicates is compared over
    the frames both placed (scipy's Procrustes: translation, scale, rotation and reflection
    removed; 0 = the same landscape, 1 = unrelated). Replicates with too few averages are skipped.
    """
    from scipy.spatial import procrustes

    replicate_of = np.asarray(replicate_of)
    placed = {}
    for rep in reps:
        rows = np.flatnonzero(replicate_of == rep.number)
        try:
            sub = embed_fn(cc[np.ix_(rows, rows)])
        except (ConfigError, ValueError):  # too few averages for the method: nothing to compare
            continue
        full = np.full((cc.shape[0], sub.shape[1]), np.nan)
        full[rows] = sub
        placed[rep.number] = frame_coordinates(num_frames, [rep], replicate_of, class_of,
                                               np.nan_to_num(full))["coords"]
    pairs = {}
    numbers = sorted(placed)
    for i, a in enumerate(numbers):
        for b in numbers[i + 1:]:
            both = np.all(np.isfinite(placed[a]), axis=1) & np.all(np.isfinite(placed[b]), axis=1)
            if both.sum() <= placed[a].shape[1]:
                continue
            try:
                _, _, disparity = procrustes(placed[a][both], placed[b][both])
            except ValueError:  # a replicate's landscape is one point: no shape to compare
                continue
            pairs[f"{a}-{b}"] = {"disparity": float(disparity), "frames": int(both.sum())}
    values = [p["disparity"] for p in pairs.values()]
    return {"pairs": pairs, "mean_disparity": float(np.mean(values)) if values else None,
            "replicates_embedded": numbers}
