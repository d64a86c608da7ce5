"""Agreement of 3D intensity volumes: shell-wise Pearson correlation in |q| shells.

Volumes are centred grids (``intens[i, j, l]`` at q = (i, j, l) - N // 2 voxels). Intensities are
compared per shell because they fall by orders of magnitude with |q|: one global correlation would
only score the centre. The correlation is scale-free per shell, so an unknown overall scale (or a
scale that drifts slowly with q) does not matter.
"""

from __future__ import annotations

import itertools

import numpy as np


def centre_crop(volume: np.ndarray, size: int) -> np.ndarray:
    """The size^3 block of a centred volume with the same q = 0 voxel (centre at size // 2)."""
    n = volume.shape[0]
    lo = n // 2 - size // 2
    if lo < 0 or lo + size > n:
        raise ValueError(f"cannot crop a {n}^3 volume to {size}^3")
    return volume[lo:lo + size, lo:lo + size, lo:lo + size]


def on_grid(volume: np.ndarray, size: int, step: float = 1.0) -> np.ndarray:
    """A centred volume on a size³ grid whose q step is ``step`` of its own: cropped when
    ``step`` is 1, else sampled by cubic splines (clipped at 0, read at the edge value beyond)."""
    if step == 1.0:
        return centre_crop(volume, size)
    from scipy.ndimage import map_coordinates

    axis = (np.arange(size) - size // 2) * float(step) + volume.shape[0] // 2
    grid = np.meshgrid(axis, axis, axis, indexing="ij")
    return np.maximum(map_coordinates(np.asarray(volume, dtype=np.float64), grid, order=3,
                                      mode="nearest"), 0.0)


def shell_correlation(a: np.ndarray, b: np.ndarray, shell_width: float = 1.0,
                      qmin: float = 0.0, qmax: float | None = None,
                      log: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of two centred volumes (same shape) in |q| shells.

    Returns (shell centres in voxels, correlation per shell); shells start at ``qmin`` and stop at
    ``qmax`` (default: the largest sphere inside the grid). ``log`` compares log intensities.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"volumes differ in shape: {a.shape} vs {b.shape}")
    n = a.shape[0]
    ax = np.arange(n) - n // 2
    r = np.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)
    qmax = float(min(n // 2, n - 1 - n // 2)) if qmax is None else float(qmax)
    if log:
        a, b = np.log(np.clip(a, 1e-30, None)), np.log(np.clip(b, 1e-30, None))
    edges = np.arange(qmin, qmax + shell_width, shell_width)
    shell = np.digitize(r, edges) - 1
    ok = (shell >= 0) & (shell < edges.size - 1)
    idx, x, y = shell[ok], a[ok], b[ok]
    k = edges.size - 1
    cnt = np.bincount(idx, minlength=k).astype(float)
    sx, sy = np.bincount(idx, x, k), np.bincount(idx, y, k)
    sxx, syy, sxy = np.bincount(idx, x * x, k), np.bincount(idx, y * y, k), np.bincount(idx,
                                                                                      x * y, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy - sx * sy / cnt
        var = (sxx - sx**2 / cnt) * (syy - sy**2 / cnt)
        cc = cov / np.sqrt(var)
    cc[(cnt < 2) | ~(var > 0)] = np.nan
    return 0.5 * (edges[:-1] + edges[1:]), cc


def cube_rotations() -> list[tuple[tuple[int, int, int], tuple[int, ...]]]:
    """The 24 proper rotations of the cube as (axis permutation, flipped axes)."""
    out = []
    for perm in itertools.permutations(range(3)):
        parity = np.linalg.det(np.eye(3)[list(perm)])
        for bits in range(8):
            flips = tuple(a for a in range(3) if bits >> a & 1)
            if parity * (-1) ** len(flips) > 0:
                out.append((perm, flips))
    return out


def best_rotation_shell_correlation(volume: np.ndarray, reference: np.ndarray,
                                    fraction: float = 0.7, qmax: float | None = None,
                                    shell_width: float = 1.0, qmin: float = 0.0) -> dict:
    """Shell correlation of ``volume`` with the best of the 24 cube rotations of ``reference``.

    The rotation is chosen by the mean shell correlation up to ``fraction`` * qmax (qmax: the
    largest |q| used, default the grid's inscribed sphere); reports the minimum over those shells
    (the target "CC >= 0.9 out to 70 % of q_max"), the mean, and the curve. Shells start at
    ``qmin`` (e.g. the beamstop: unmeasured q says nothing about the data).
    """
    n = volume.shape[0]
    qmax = float(min(n // 2, n - 1 - n // 2)) if qmax is None else float(qmax)
    best = None
    for perm, flips in cube_rotations():
        ref = np.transpose(reference, perm)
        ref = np.flip(ref, flips) if flips else ref
        q, cc = shell_correlation(volume, ref, shell_width, qmin=qmin, qmax=qmax)
        inner = q <= fraction * qmax
        score = float(np.nanmean(cc[inner]))
        if best is None or score > best["mean"]:
            best = {"mean": score, "min": float(np.nanmin(cc[inner])), "q": q, "cc": cc,
                    "rotation": (perm, flips), "qmax": qmax, "fraction": fraction}
    return best


def scaled_intensity(volume: np.ndarray, scale: float, order: int = 1) -> np.ndarray:
    """The intensity of the same shape ``scale`` times larger: scale^6 I(scale q) (a particle
    scaled by s in real space has s^3 times the electrons; the simulator's convention, see
    :mod:`spiscape.simulate.frames`). Spline interpolation of ``order`` (1: trilinear), 0
    beyond the grid."""
    from scipy.ndimage import map_coordinates

    volume = np.asarray(volume, dtype=np.float64)
    n = volume.shape[0]
    c = n // 2
    ax = np.arange(n) - c
    grid = np.stack(np.meshgrid(ax, ax, ax, indexing="ij")).reshape(3, -1).astype(np.float64)
    out = map_coordinates(volume, grid * scale + c, order=order, mode="constant", cval=0.0)
    return scale**6 * out.reshape(volume.shape)


def size_averaged(volume: np.ndarray, sizes, bins: int = 15) -> np.ndarray:
    """The mean over a population of particle sizes of s^6 I(s q): what the intensity of a
    shape with a size spread looks like, the true target of a reconstruction from such data.

    The sizes are binned (``bins`` equal-width bins, weighted by count), each bin's intensity
    from :func:`scaled_intensity`. Fringes that the spread blurs (deep minima along the cube's
    faces) keep only their blurred contrast, which no reconstruction from such frames can beat.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    sizes = sizes[np.isfinite(sizes) & (sizes > 0)]
    if sizes.size == 0 or np.ptp(sizes) == 0:
        s = float(sizes[0]) if sizes.size else 1.0
        sizes, weights = np.array([s]), np.array([1.0])
    else:
        weights, edges = np.histogram(sizes, bins=bins)
        sizes = 0.5 * (edges[:-1] + edges[1:])
        sizes, weights = sizes[weights > 0], weights[weights > 0].astype(float)
    out = sum(w * scaled_intensity(volume, s) for s, w in zip(sizes, weights, strict=True))
    return out / weights.sum()


def best_size_scale(volume: np.ndarray, reference: np.ndarray, qmin: float = 0.0,
                    qmax: float | None = None, fraction: float = 0.7,
                    scales=None) -> dict:
    """The size, relative to ``reference``, whose fringes ``volume`` has: the s that maximises
    the mean shell correlation of ``volume`` with scaled_intensity(reference, s) over the shells
    ``qmin`` to ``fraction`` * ``qmax`` (best of the 24 cube rotations, chosen at s = 1), refined
    by a parabola through the best grid point and its neighbours. Cubic splines: trilinear
    interpolation of the deep fringe minima of a sharp particle costs some shells 0.3 of their
    correlation at the right size.

    Fringe positions scale as 1 / size whatever the shape, so this reads the size of a decoded
    volume without phasing it: s^3 is its volume relative to the reference's. Shell
    correlations in the steep fall-off of a fringe are sharp functions of s (a cube 2 % too
    large loses 0.08 in its first-minimum shell), which makes the estimate precise to ~0.2 %.
    Returns ``scale``, ``score`` (the mean shell CC there), the grid ``scales``, ``scores``
    and ``at_edge``: the best score is the grid's first or last, so the size is out of its range
    or the fringes too blurred to show an optimum; ``scale`` then says nothing.
    """
    scales = np.arange(0.9, 1.1001, 0.01) if scales is None else np.asarray(scales, float)
    n = volume.shape[0]
    qmax = float(min(n // 2, n - 1 - n // 2)) if qmax is None else float(qmax)
    perm, flips = best_rotation_shell_correlation(volume, reference, fraction, qmax,
                                                  qmin=qmin)["rotation"]
    ref = np.transpose(reference, perm)
    ref = np.flip(ref, flips) if flips else ref
    scores = []
    for s in scales:
        q, cc = shell_correlation(volume, scaled_intensity(ref, s, order=3), qmin=qmin,
                                  qmax=qmax)
        scores.append(float(np.nanmean(cc[q <= fraction * qmax])))
    scores = np.asarray(scores)
    k = int(np.nanargmax(scores))
    best = float(scales[k])
    if 0 < k < scales.size - 1:
        y0, y1, y2 = scores[k - 1], scores[k], scores[k + 1]
        curv = y0 - 2 * y1 + y2
        if curv < 0:
            best += 0.5 * (y0 - y2) / curv * float(scales[k + 1] - scales[k])
    return {"scale": best, "score": float(scores[k]), "scales": scales, "scores": scores,
            "at_edge": k in (0, scales.size - 1)}
