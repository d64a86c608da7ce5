"""Orientation and gain of 2D class averages by correlation with Ewald slices of a reference.

All averages are correlated with all slices of a rotation grid over the asymmetric unit of the
point group as one matrix product (A, P) x (P, R) — BLAS on a CPU, cuBLAS through CuPy on a GPU
— then the best grid rotations are refined on finer local grids. The gain of an average is its
best CC divided by its mean CC over the (uniform) grid: about 1 for an average that looks the
same in every orientation (a sphere), higher the more the average singles out one orientation of
the reference (the paper's "cubicness").

Transform before the CC: log(I + eps), eps a fraction (``floor``) of the image's median over
the support. Raw intensities fall by 4-6 decades from the centre to the edge, so a raw CC only
compares the few central pixels, where every orientation of a cube looks alike; the log gives
every fringe of the outer rings a say. The floor keeps the exact zeros of an ideal reference and
the empty pixels of a sparse average from dominating, and being proportional to the image's own
level it makes the transform (after centring) independent of the fluence scale of the average.
Only grid points in the average's ``support`` (measured pixels) enter the CC.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from spiscape.backend import to_numpy
from spiscape.orient import rotations as rot
from spiscape.orient.slices import rotated_slices

log = logging.getLogger(__name__)

TRANSFORM = "log(I + floor * median(I)), centred and normalised over the support"


@dataclass
class OrientationResult:
    quaternion: np.ndarray  # (A, 4) scalar first, w >= 0, in the fundamental zone
    cc: np.ndarray  # (A,) best CC after refinement
    gain: np.ndarray  # (A,) cc / mean_cc
    mean_cc: np.ndarray  # (A,) mean CC over the grid
    grid_cc: np.ndarray  # (A,) best CC on the grid
    num_rotations: int
    info: dict = field(default_factory=dict)


def log_transform(values, floor: float = 0.1, xp=np):
    """Rows (n, P) -> log(max(I, 0) + eps), eps = floor x the row's median (its mean where the
    median is 0), then centred and scaled to unit norm so that a dot product is a CC."""
    values = xp.maximum(xp.asarray(values, dtype=xp.float64), 0.0)
    level = xp.median(values, axis=-1, keepdims=True)
    mean = xp.mean(values, axis=-1, keepdims=True)
    level = xp.where(level > 0, level, mean)
    level = xp.where(level > 0, level, 1.0)
    out = xp.log(values + floor * level)
    return normalise_rows(out, xp)


def normalise_rows(x, xp=np):
    x = x - xp.mean(x, axis=-1, keepdims=True)
    norm = xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True))
    return x / xp.where(norm > 0, norm, 1.0)


def _chunk(num_points: int, budget: int = 1 << 22) -> int:
    """Rotations per block so that a block's rotated points stay near 100 MB."""
    return max(1, budget // max(1, num_points))


def grid_search(targets, reference, points, quats, floor, xp=np, candidates: int = 1):
    """CC of every target (A, P, transformed) with every slice of quats (R, 4).

    Returns (top CCs (A, k), top rotation indices (A, k), mean CC (A,)), k = candidates.
    """
    num = targets.shape[0]
    k = max(1, min(candidates, len(quats)))
    top_cc = np.full((num, k), -np.inf)
    top_idx = np.zeros((num, k), dtype=np.int64)
    total = np.zeros(num)
    step = _chunk(points.shape[0])
    for start in range(0, len(quats), step):
        block = quats[start:start + step]
        slices = log_transform(rotated_slices(reference, points, rot.to_matrix(block), xp),
                               floor, xp)
        cc = to_numpy(targets @ slices.T)  # (A, block)
        total += cc.sum(axis=1)
        merged_cc = np.concatenate([top_cc, cc], axis=1)
        merged_idx = np.concatenate(
            [top_idx, np.broadcast_to(np.arange(start, start + len(block)), cc.shape)], axis=1)
        order = np.argsort(-merged_cc, axis=1, kind="stable")[:, :k]
        top_cc = np.take_along_axis(merged_cc, order, axis=1)
        top_idx = np.take_along_axis(merged_idx, order, axis=1)
    return top_cc, top_idx, total / len(quats)


def local_search(targets, reference, points, centres, offsets, floor, xp=np):
    """Best of centres[a] * offsets[l] for each target a: (best quats (A, 4), best CC (A,))."""
    num = targets.shape[0]
    best_cc = np.full(num, -np.inf)
    best_q = np.array(centres, dtype=np.float64)
    per_block = max(1, _chunk(points.shape[0]) // len(offsets))
    for start in range(0, num, per_block):
        sel = slice(start, min(num, start + per_block))
        cand = rot.multiply(centres[sel, None, :], offsets[None, :, :])  # (a, L, 4)
        flat = cand.reshape(-1, 4)
        slices = log_transform(rotated_slices(reference, points, rot.to_matrix(flat), xp),
                               floor, xp).reshape(cand.shape[0], len(offsets), -1)
        cc = to_numpy(xp.einsum("ap,alp->al", targets[sel], slices))
        pick = np.argmax(cc, axis=1)
        best_cc[sel] = cc[np.arange(len(pick)), pick]
        best_q[sel] = cand[np.arange(len(pick)), pick]
    return rot.canonical(best_q), best_cc


def orient_averages(
    averages,
    support,
    points,
    reference,
    point_group: str = "m-3m",
    step_deg: float = 3.0,
    refine_deg: float = 1.0,
    floor: float = 0.1,
    candidates: int = 2,
    xp=np,
) -> OrientationResult:
    """Orientation, CC and gain of each average (A, S, S) against the reference.

    points: (S * S, 3) Ewald q of the grid (see slices.ewald_points); support (S, S) bool.
    The grid covers the asymmetric unit of ``point_group`` with about ``step_deg`` spacing; the
    best ``candidates`` grid rotations of each average are refined coarse to fine on local grids
    (see :func:`refinement_passes`) down to a spacing of at most ``refine_deg``.
    """
    t0 = time.perf_counter()
    averages = np.asarray(averages, dtype=np.float64)
    num = averages.shape[0]
    mask = np.asarray(support, dtype=bool).reshape(-1)
    pts = np.asarray(points, dtype=np.float64)[mask]
    targets = log_transform(xp.asarray(averages.reshape(num, -1)[:, mask]), floor, xp)
    group = rot.point_group(point_group)
    info = {"transform": TRANSFORM, "floor": floor, "point_group": point_group,
            "step_deg": step_deg, "refine_deg": refine_deg, "num_points": int(mask.sum())}
    if getattr(reference, "isotropic", False):
        # every orientation gives the same slice: nothing to orient
        identity = np.tile([1.0, 0.0, 0.0, 0.0], (num, 1))
        slices = log_transform(rotated_slices(reference, pts, rot.to_matrix(identity[:1]), xp),
                               floor, xp)
        cc = to_numpy(targets @ slices.T)[:, 0]
        info["note"] = "isotropic reference: orientation undefined, identity reported, gain 1"
        return OrientationResult(identity, cc, np.ones(num), cc.copy(), cc.copy(), 1, info)

    grid = rot.asymmetric_unit(rot.so3_grid(step_deg), group)
    top_cc, top_idx, mean_cc = grid_search(targets, reference, pts, grid, floor, xp, candidates)
    t1 = time.perf_counter()
    log.info("grid: %d rotations in the asymmetric unit of %s (step %g deg) x %d averages x "
             "%d points: %.1f s", len(grid), point_group, step_deg, num, len(pts), t1 - t0)

    best_q = grid[top_idx[:, 0]]
    best_cc = top_cc[:, 0].copy()
    if refine_deg and refine_deg > 0:
        passes = refinement_passes(step_deg, refine_deg)
        for c in range(top_idx.shape[1]):
            q = grid[top_idx[:, c]]
            cc = top_cc[:, c]
            for spacing, radius in passes:
                q_new, cc_new = local_search(targets, reference, pts, q,
                                             rot.local_grid(spacing, radius), floor, xp)
                better = cc_new > cc
                q = np.where(better[:, None], q_new, q)
                cc = np.where(better, cc_new, cc)
            improve = cc > best_cc
            best_q[improve] = q[improve]
            best_cc[improve] = cc[improve]
        log.info("refinement (%d candidates, local grids of %s deg): %.1f s", top_idx.shape[1],
                 ", ".join(f"{s:.3g}" for s, _ in passes), time.perf_counter() - t1)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(mean_cc > 0, best_cc / mean_cc, np.nan)
    info["seconds"] = time.perf_counter() - t0
    return OrientationResult(rot.reduce(best_q, group), best_cc, gain, mean_cc, top_cc[:, 0],
                             len(grid), info)


def size_range(q_per_pixel: float, max_q: float) -> tuple[float, float]:
    """Particle sizes (nm) a detector can tell apart: from three fringes inside its largest |q|
    (``max_q`` pixels) to an oversampling of two (a fringe two pixels wide)."""
    return 3.0 / (max_q * q_per_pixel), 1.0 / (2.0 * q_per_pixel)


def ring_detrend(x, rings: np.ndarray, xp=np):
    """Rows of x (.., P) minus their mean on each ring (integer |q| shell ``rings (P,)``),
    normalised: what is left is the angular pattern of every ring (streaks, their fringes)."""
    ring = xp.asarray(rings)
    count = xp.bincount(ring).astype(x.dtype)
    flat = x.reshape(-1, x.shape[-1])
    means = xp.stack([xp.bincount(ring, weights=row) for row in flat]) / xp.maximum(count, 1)
    return normalise_rows((flat - means[:, ring]).reshape(x.shape), xp)


def fit_size(averages, support, points, make_reference, sizes, point_group: str = "m-3m",
             step_deg: float = 10.0, floor: float = 0.1, max_averages: int = 40, xp=np):
    """The reference size (nm) whose slices match the averages best: for each size of
    ``sizes`` the mean over (up to ``max_averages``, evenly spread) averages of their best CC on
    a coarse rotation grid, then a finer scan (1 %) around the best. ``make_reference(size)``
    builds the reference. Returns (size, {size: mean best CC}).

    The CC here compares the angular pattern on each ring (log intensity minus its ring mean,
    :func:`ring_detrend`): the radial fall-off says little about size (a small smooth particle
    matches any steep envelope best, and a simulator's or detector's envelope differs from an
    ideal cube's), while the spacing of the fringes along the streaks is the size.

    Why: an analytic reference of the wrong size orients nothing (the issue's held-out set, a
    42 nm cube against other sizes: CC 0.65-0.73); the size is what the data show, not a number
    to assume."""
    averages = np.asarray(averages, dtype=np.float64)
    pick = np.unique(np.linspace(0, averages.shape[0] - 1,
                                 min(max_averages, averages.shape[0])).astype(int))
    mask = np.asarray(support, dtype=bool).reshape(-1)
    pts = np.asarray(points, dtype=np.float64)[mask]
    rings = np.rint(np.linalg.norm(pts, axis=1)).astype(np.int64)
    targets = ring_detrend(log_transform(
        xp.asarray(averages[pick].reshape(len(pick), -1)[:, mask]), floor, xp), rings, xp)
    grid = rot.asymmetric_unit(rot.so3_grid(step_deg), rot.point_group(point_group))
    matrices = rot.to_matrix(grid)
    scores: dict[float, float] = {}

    def score(size: float) -> float:
        if size not in scores:
            reference = make_reference(size)
            best = np.full(len(pick), -np.inf)
            step = _chunk(pts.shape[0])
            for start in range(0, len(grid), step):
                slices = ring_detrend(log_transform(
                    rotated_slices(reference, pts, matrices[start:start + step], xp), floor, xp),
                    rings, xp)
                best = np.maximum(best, to_numpy(targets @ slices.T).max(axis=1))
            scores[size] = float(np.mean(best))
        return scores[size]

    coarse = max(sizes, key=score)
    fine = coarse * np.exp(np.linspace(-0.05, 0.05, 11))
    best = max(fine, key=score)
    return float(best), scores


def refinement_passes(step_deg: float, refine_deg: float) -> list[tuple[float, float]]:
    """(spacing, radius) of the local grids: spacing step/2, step/4, ... down to refine_deg or
    below, each over a ball of two spacings (33 rotations), so that the first pass covers the
    grid's cells (covering radius < step) and each pass covers the previous pass's cell."""
    passes = []
    spacing = step_deg / 2.0
    while True:
        passes.append((spacing, 2.0 * spacing))
        if spacing <= refine_deg or len(passes) >= 12:
            return passes
        spacing /= 2.0


def best_slices(reference, points, quats, xp=np) -> np.ndarray:
    """The reference slices (A, S * S) at each average's orientation, for figures."""
    return to_numpy(rotated_slices(reference, points, rot.to_matrix(quats), xp))
