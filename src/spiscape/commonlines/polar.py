"""Radial lines through the centre of 2D class averages: sampling, masks, transform, normalisation.

Geometry. An average is an S×S image ``intens[x, y]`` (first axis the detector's x) with the beam
at ``c = (S - 1) / 2``. The line at angle θ runs along ``(cos θ, sin θ)`` in (x, y); its sample at
signed radius r is the bilinear interpolation of the image at ``(c + r cos θ, c + r sin θ)``.
Angles are ``θ_l = l π / n_angles`` over [0, π) and radii ``r_min, r_min + step, ... <= r_max``
(pixels of the average's grid).

Friedel. Intensities are centrosymmetric, I(-q) = I(q), so the half-lines at θ and θ + π are the
same profile and lines over [0, π) cover every direction. Two layouts (``lines``):

``friedel`` (default)  each sample is the mean of the measured values at +r and -r (both halves
                       of the diameter): the Friedel-symmetrised half-line, r >= r_min. It uses
                       every measured pixel, fills a half-line hidden by an asymmetric mask
                       (panel gap) from its mate, and makes the comparison of two lines
                       independent of their direction (a(r) against b(r) or b(-r) is the same).
``diameter``           the full line from -r_max to r_max (|r| >= r_min), as Dragonfly's
                       ``calc_cc`` samples it; lines are compared in the same direction only.
                       For a centrosymmetric average (EMC with Friedel symmetry on) its Pearson
                       correlations equal those of ``friedel`` exactly; it exists to match
                       Dragonfly's definition in benchmarks.

Missing samples. ``support`` marks the grid points that hold a measurement (shared by every
average of a file). A sample is measured only when every bilinear neighbour with non-zero weight
is in the support and inside the grid; in ``friedel`` layout it is measured when either half is.
The mask of the samples is therefore the same for all averages, which lets the correlation stay a
matrix product (see :mod:`spiscape.commonlines.correlate`). With ``missing="common"`` (default) a
radius that is missing at any angle is dropped for every line: what remains is measured on every
line, so each line pair is correlated over exactly the same samples and the Pearson CC is one dot
product of normalised lines. Because the support is the union of the detector over all in-plane
rotations it is a disc minus the beamstop, up to the grid's discretisation, so this drops only the
partially covered rims (logged). ``missing="overlap"`` keeps every radius and computes each
line pair's Pearson CC over the samples measured on both lines (exact, five products per pair).

Transforms (``transform``), applied to the sampled lines of each average before normalisation:

``log`` (default)  ``log(1 + I / m)``, m the median of the average's measured line samples. The
                   intensity falls by three to four decades from the beamstop to the edge (~q^-4),
                   so on raw intensities the Pearson CC is decided by the few innermost samples
                   and nearly every pair of similar-sized particles correlates at ~1; the log
                   gives every speckle ring a say. m (a scale of the average itself) keeps the
                   result independent of the average's overall scale, and the ``1 +`` keeps weak,
                   noisy outer samples (below the median) from being blown up. On the demo
                   averages (60, scored against each one's majority truth population) the chance
                   that a same-population pair outscores a different-population pair (ROC AUC)
                   is 0.93 for log, 0.91 for none and 0.79 for radial.
``none``           raw intensities (Dragonfly's and, as far as we know, the paper's definition).
``radial``         ``I / <I>_θ(r)``, each radius divided by the average's own azimuthal mean:
                   only the anisotropy remains (every ring has equal weight), so it is blind to
                   isotropic structure: a sphere's lines become flat (CC 0 against anything).

Normalisation: each line is centred and scaled to unit norm over its measured samples (missing
samples set to 0), so a dot product of two lines measured on the same samples is their Pearson
CC. A line without variance (constant) is all zeros and correlates 0 with everything.

Size spread (``scale_range``). Two particles of one shape whose sizes differ by a factor k give
patterns that differ by a radial scaling: I_small(q) = c I_large(k q). A population with a few
per cent of size spread therefore spreads along a line of the plain CC matrix (its fringes drift
out of step at high q), and a clustering of the embedding splits it by size. With
``scale_range`` ρ > 0 the CC of a pair is the best over radial scalings s of the second average
too, s on a geometric grid over [1 / (1 + ρ), 1 + ρ] (always with s = 1) whose neighbours move
the outermost sample by at most ``SCALE_SHIFT_PX``: line la of i over radii r against line lb
of j over radii s r, for the radii r with both r and s r inside the sampled range, the samples at
s r interpolated linearly along the (transformed) line. The scale of the best pair is kept: the
second average's size relative to the first is then 1 / s. Shape differences (a cube against a
sphere, a rod against either) are not a scaling and still decorrelate. It needs the one-product
layout (``lines="friedel"``, ``missing="common"``) and costs one correlation per scale.

Ewald curvature. The averages live on the flat detector grid. Two central slices of one object
meet on a straight line through the origin only at small angles: on the Ewald sphere the common
"line" of frames whose beam directions differ by β is an arc whose sideways offset at radius ρ is
ρ² tan(β/2) / (2D) pixels (D the detector distance in pixels, β <= 90° after Friedel). For the
default detector (705 mm, 4 × 200 µm pixels, D = 881 px, 1.8° maximum scattering angle, ρ <= 28 px)
that is qz = ρ²/(2D) <= 0.44 px at the rim: under one pixel and under one angular step (1° at
n_angles = 180, 0.9° at the rim). No correction is applied; it would matter (an offset of a pixel
or more) for data reaching ρ_max ≳ sqrt(2D) ≈ 42 px at this distance, i.e. scattering angles
above ~2.7°.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from spiscape.errors import ConfigError

log = logging.getLogger(__name__)

TRANSFORMS = ("log", "none", "radial")
LAYOUTS = ("friedel", "diameter")
#: neighbouring scales of the size search move the outermost sample by at most this (pixels)
SCALE_SHIFT_PX = 0.5
#: the size search's default in the CLI and the workflow (PolarParams() alone keeps the paper's
#: plain CC): nanoparticle samples' size spreads (the validation matrix holds 1-8 % per
#: population) stay well inside ±15 %, two populations of one shape whose sizes differ by more
#: are told apart
SCALE_RANGE = 0.15
MISSING = ("common", "overlap")

#: bilinear weights below this count as zero (rounding of cos/sin at multiples of π/2)
WEIGHT_EPS = 1e-9


@dataclass(frozen=True)
class PolarParams:
    """Every setting that decides the line samples, hence the common-line CC.

    r_max None means "auto": the largest radius inside the grid; with missing="common" radii
    missing at some angle are then dropped, so auto ends at the support's rim.
    """

    n_angles: int = 180
    r_min: float = 3.0
    r_max: float | None = None
    radial_step: float = 1.0
    transform: str = "log"
    lines: str = "friedel"
    missing: str = "common"
    scale_range: float = 0.0

    def __post_init__(self):
        if self.n_angles < 1:
            raise ConfigError(f"n_angles must be at least 1, got {self.n_angles}")
        if self.radial_step <= 0:
            raise ConfigError(f"radial_step must be positive, got {self.radial_step}")
        if self.r_min < 0:
            raise ConfigError(f"r_min must be >= 0, got {self.r_min}")
        if self.r_max is not None and self.r_max < self.r_min:
            raise ConfigError(f"r_max {self.r_max} is below r_min {self.r_min}")
        if not 0.0 <= self.scale_range < 1.0:
            raise ConfigError(f"scale_range must be in [0, 1), got {self.scale_range}")
        if self.scale_range > 0 and (self.lines, self.missing) != ("friedel", "common"):
            raise ConfigError("scale_range > 0 needs lines 'friedel' and missing 'common' "
                              f"(got {self.lines!r}, {self.missing!r})")
        for name, allowed in (("transform", TRANSFORMS), ("lines", LAYOUTS),
                              ("missing", MISSING)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def as_attrs(self) -> dict:
        """HDF5 attributes ("auto" for r_max None)."""
        out = dataclasses.asdict(self)
        out["r_max"] = "auto" if self.r_max is None else float(self.r_max)
        out["interpolation"] = "bilinear"
        return out


def line_angles(n_angles: int) -> np.ndarray:
    """Angles θ_l = l π / n_angles (radians) of the lines, over [0, π)."""
    return np.arange(n_angles) * (np.pi / n_angles)


def radii(size: int, r_min: float, r_max: float | None, step: float = 1.0) -> np.ndarray:
    """Radii r_min, r_min + step, ... up to r_max (auto: the grid's half-width (S - 1) / 2)."""
    limit = (size - 1) / 2.0
    top = limit if r_max is None else min(float(r_max), limit)
    if r_min > top:
        raise ConfigError(f"r_min {r_min} lies beyond the {size}x{size} grid (radius {limit})")
    count = int(np.floor((top - r_min) / step + 1e-9)) + 1
    return r_min + step * np.arange(count)


def bilinear_operator(x: np.ndarray, y: np.ndarray, size: int):
    """Sparse (P, S²) matrix interpolating an S×S image (flattened, x first) at points (x, y),
    and a (P, S²) 0/1 pattern of the neighbours with non-zero weight.

    Points outside [0, S - 1]² get an empty row (they are never measured).
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    inside = (x >= -WEIGHT_EPS) & (x <= size - 1 + WEIGHT_EPS)
    inside &= (y >= -WEIGHT_EPS) & (y <= size - 1 + WEIGHT_EPS)
    xc, yc = np.clip(x, 0, size - 1), np.clip(y, 0, size - 1)
    x0 = np.minimum(np.floor(xc).astype(np.int64), size - 2)
    y0 = np.minimum(np.floor(yc).astype(np.int64), size - 2)
    fx, fy = xc - x0, yc - y0
    cols = np.stack([x0 * size + y0, x0 * size + y0 + 1,
                     (x0 + 1) * size + y0, (x0 + 1) * size + y0 + 1], axis=1)
    weights = np.stack([(1 - fx) * (1 - fy), (1 - fx) * fy, fx * (1 - fy), fx * fy], axis=1)
    weights[~inside] = 0.0
    weights[weights < WEIGHT_EPS] = 0.0
    rows = np.repeat(np.arange(x.size), 4)
    shape = (x.size, size * size)
    interp = sp.csr_matrix((weights.ravel(), (rows, cols.ravel())), shape=shape)
    interp.eliminate_zeros()
    pattern = interp.copy()
    pattern.data[:] = 1.0
    return interp, pattern


def sample_points(size: int, angles: np.ndarray, signed_radii: np.ndarray):
    """Grid coordinates (x, y), each (L, R), of the samples at angles × signed radii."""
    c = (size - 1) / 2.0
    x = c + np.cos(angles)[:, None] * signed_radii[None, :]
    y = c + np.sin(angles)[:, None] * signed_radii[None, :]
    return x, y


def sample_lines(intens: np.ndarray, support: np.ndarray, params: PolarParams,
                 chunk: int = 512):
    """Lines of every average and their measured-sample mask, before any transform.

    Returns ``lines (A, L, R)`` float64 (0 where not measured), ``mask (L, R)`` bool (shared by
    all averages) and ``signed_radii (R,)`` (negative radii only in the diameter layout).
    Averages are interpolated ``chunk`` at a time to bound the memory.
    """
    intens = np.asarray(intens)
    count, size = intens.shape[0], intens.shape[-1]
    support = np.asarray(support, dtype=bool)
    angles = line_angles(params.n_angles)
    r = radii(size, params.r_min, params.r_max, params.radial_step)
    if params.lines == "diameter":
        halves = [np.concatenate([-r[::-1], r]) if r[0] > 0 else np.concatenate([-r[:0:-1], r])]
    else:
        halves = [r, -r]
    missing = (~support).ravel().astype(np.float64)
    operators, oks = [], []
    for signed in halves:
        x, y = sample_points(size, angles, signed)
        interp, pattern = bilinear_operator(x, y, size)
        empty = np.asarray(interp.getnnz(axis=1) == 0)
        oks.append(~((pattern @ missing > 0) | empty).reshape(x.shape))
        operators.append(interp)
    weight = sum(ok.astype(np.float64) for ok in oks)
    mask = weight > 0
    keep = mask.all(axis=0) if params.missing == "common" else np.ones(mask.shape[1], bool)
    if not keep.all():
        log.info("radii %s are not measured at every angle: dropped (missing=common)",
                 ", ".join(f"{v:g}" for v in halves[0][~keep]))
    mask, signed = mask[:, keep], halves[0][keep]
    if mask.shape[1] == 0 or mask.sum(axis=1).min() < 3:
        raise ConfigError(
            f"fewer than 3 measured samples on some line with r_min={params.r_min}, "
            f"r_max={params.r_max or 'auto'}: widen the radial range or use --missing overlap"
        )
    shape = (params.n_angles, halves[0].size)
    lines = np.empty((count, params.n_angles, int(keep.sum())))
    for start in range(0, count, chunk):
        block = intens[start:start + chunk].astype(np.float64)
        flat = np.where(support, block, 0.0).reshape(block.shape[0], size * size).T
        total = np.zeros((block.shape[0],) + shape)
        for interp, ok in zip(operators, oks, strict=True):
            values = (interp @ flat).T.reshape((block.shape[0],) + shape)
            total += np.where(ok[None], values, 0.0)
        # the Friedel layout averages the measured halves (one or two) of each sample
        lines[start:start + chunk] = (total / np.where(weight > 0, weight, 1.0)[None])[:, :, keep]
    return lines, mask, signed


def transform_lines(lines: np.ndarray, mask: np.ndarray, transform: str) -> np.ndarray:
    """Apply ``transform`` (module docstring) to lines (A, L, R) over their measured samples."""
    lines = np.asarray(lines, dtype=np.float64)
    weight = np.broadcast_to(mask, lines.shape)
    if transform == "none":
        return np.where(weight, lines, 0.0)
    if transform == "log":
        positive = np.maximum(lines, 0.0)
        scale = np.array([np.median(p[mask]) if mask.any() else 0.0 for p in positive])
        if np.any(scale <= 0):
            # half the samples are zero: fall back to the mean so the scale stays positive
            mean = positive.sum(axis=(1, 2)) / max(mask.sum(), 1)
            scale = np.where(scale > 0, scale, mean)
        safe = np.where(scale > 0, scale, 1.0)[:, None, None]
        return np.where(weight & (scale[:, None, None] > 0), np.log1p(positive / safe), 0.0)
    if transform == "radial":
        counts = mask.sum(axis=0)  # (R,)
        ring = np.where(weight, lines, 0.0).sum(axis=1) / np.maximum(counts, 1)  # (A, R)
        ok = ring > 0
        return np.where(weight & ok[:, None, :], lines / np.where(ok, ring, 1.0)[:, None, :], 0.0)
    raise ConfigError(f"transform must be one of {TRANSFORMS}, got {transform!r}")


def normalise_lines(lines: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Centre each line and scale it to unit norm over its measured samples; 0 elsewhere.

    A constant line (no variance) becomes all zeros.
    """
    weight = np.broadcast_to(mask, lines.shape).astype(np.float64)
    count = np.maximum(weight.sum(axis=-1, keepdims=True), 1.0)
    centred = (lines - (lines * weight).sum(axis=-1, keepdims=True) / count) * weight
    norm = np.sqrt((centred**2).sum(axis=-1, keepdims=True))
    # a line whose spread is at rounding level of its values is constant
    scale = np.abs(lines * weight).max(axis=-1, keepdims=True)
    flat = norm <= 1e-12 * np.maximum(scale, 1e-300) * np.sqrt(count)
    return np.where(flat, 0.0, centred / np.where(flat, 1.0, norm))


def polar_lines(intens: np.ndarray, support: np.ndarray, params: PolarParams,
                normalise: bool = True):
    """Sampled, transformed and normalised lines ``(A, L, R)``, the mask ``(L, R)`` and radii
    (``normalise=False``: transformed only, for :func:`scaled_lines`)."""
    lines, mask, signed = sample_lines(intens, support, params)
    lines = transform_lines(lines, mask, params.transform)
    return (normalise_lines(lines, mask) if normalise else lines), mask, signed


def scale_factors(scale_range: float, r_max: float) -> np.ndarray:
    """Radial scales s of the size search (module docstring): geometric, symmetric about 1
    (which is always one of them), neighbours moving radius ``r_max`` by <= SCALE_SHIFT_PX."""
    if scale_range <= 0:
        return np.ones(1)
    top = float(np.log1p(scale_range))
    count = max(1, int(np.ceil(top * float(r_max) / SCALE_SHIFT_PX)))
    return np.exp(np.arange(-count, count + 1) * (top / count))


def scaled_lines(lines: np.ndarray, radii_used: np.ndarray, scale: float):
    """Transformed lines ``(A, L, R)`` on the uniform radii ``radii_used``, as two normalised
    stacks over the radii r whose scaled radius s r lies in the sampled range: ``base`` at r and
    ``scaled`` at s r (linear along the line). Returns ``(base, scaled)``, each ``(A, L, R_s)``.
    """
    r = np.asarray(radii_used, dtype=np.float64)
    step = r[1] - r[0] if r.size > 1 else 1.0
    target = r * scale
    keep = (target >= r[0] - 1e-9) & (target <= r[-1] + 1e-9)
    if keep.sum() < 3:
        raise ConfigError(f"scale {scale:.3f} leaves fewer than 3 radii in {r[0]:g}..{r[-1]:g}: "
                          "lower scale_range or widen the radial range")
    position = np.clip((target[keep] - r[0]) / step, 0.0, r.size - 1)
    low = np.minimum(np.floor(position).astype(np.int64), max(r.size - 2, 0))
    frac = position - low
    high = np.minimum(low + 1, r.size - 1)
    scaled = lines[..., low] * (1.0 - frac) + lines[..., high] * frac
    mask = np.ones(lines.shape[1:2] + (int(keep.sum()),), dtype=bool)
    return normalise_lines(lines[..., keep], mask), normalise_lines(scaled, mask)
