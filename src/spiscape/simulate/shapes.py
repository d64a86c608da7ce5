"""Particle densities on an N^3 real-space grid: cubes, superballs, spheres and contaminants.

Every particle has uniform (gold) density 1 inside its surface and is centred on voxel N // 2,
the same index that holds q = 0 after the FFT. Voxels cut by the surface hold the fraction of
their volume inside it (estimated on S^3 sub-points per voxel with a one-spacing ramp across the
surface, see voxelise), which suppresses the aliasing of sharp edges; the intensity functions
divide out the slight smoothing this box averaging causes.

The cube -> sphere melting series is the superball |x|^p + |y|^p + |z|^p <= r^p with 1/p going
linearly from 1/p_max (t = 0, a cube with slightly rounded edges) to 1/2 (t = 1, a sphere) while
the volume grows linearly, V(t) = a^3 (1 + growth t), as it does when a gold nanocube melts into
a sphere.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import gammaln

from spiscape.errors import ConfigError

#: sub-points per voxel and axis used to estimate partial volumes
DEFAULT_SUPERSAMPLE = 2


def superball_volume(r, p):
    """Volume of |x|^p + |y|^p + |z|^p <= r^p: 8 r^3 Gamma(1 + 1/p)^3 / Gamma(1 + 3/p)."""
    p = np.asarray(p, dtype=np.float64)
    return 8.0 * np.asarray(r, dtype=np.float64) ** 3 * np.exp(
        3.0 * gammaln(1.0 + 1.0 / p) - gammaln(1.0 + 3.0 / p)
    )


def superball_exponent(t, p_max: float = 12.0):
    """Exponent p of the melting series: 1/p linear from 1/p_max at t = 0 to 1/2 at t = 1.

    Linear in 1/p rather than in p or log p because the rounding of the edges, which is what the
    diffraction sees, follows 1/p: with p log-linear half of the series (p from 12 to 5) would
    still look like a cube and the shape change would crowd into the last quarter of t.
    """
    t = np.asarray(t, dtype=np.float64)
    return 1.0 / ((1.0 - t) / p_max + t / 2.0)


def melting_volume(t, cube_edge: float, volume_growth: float = 0.10):
    """Particle volume along the melting series: V(t) = a^3 (1 + growth t)."""
    return cube_edge**3 * (1.0 + volume_growth * np.asarray(t, dtype=np.float64))


def melting_radius(t, cube_edge: float, p_max: float = 12.0, volume_growth: float = 0.10):
    """Superball radius r(t) that gives the volume V(t) at the exponent p(t)."""
    p = superball_exponent(t, p_max)
    unit = superball_volume(1.0, p)
    return (melting_volume(t, cube_edge, volume_growth) / unit) ** (1.0 / 3.0)


def sphere_diameter_for_volume(volume: float) -> float:
    return float((6.0 * volume / np.pi) ** (1.0 / 3.0))


def voxelise(
    distance: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    half_extent_nm: float,
    grid_size: int,
    voxel_nm: float,
    supersample: int = DEFAULT_SUPERSAMPLE,
    full: bool = True,
    mirror: bool = True,
) -> np.ndarray:
    """Fill fraction of every voxel for the solid {distance(x, y, z) <= 0} (coordinates in nm).

    ``distance`` is a signed distance to the surface in nm (negative inside; an estimate is
    enough near the surface) evaluated on broadcastable 1D coordinate arrays (shapes (n,1,1),
    (1,n,1), (1,1,n)) of S sub-points per voxel and axis. Each sub-point contributes
    clip(1/2 - distance / spacing, 0, 1) rather than 0 or 1: a ramp one sub-point spacing wide
    makes the sum exact for a plane at any offset, so flat faces do not snap to the sub-grid
    and the fill fractions are the voxels' partial volumes. Only the cube of half-width
    half_extent_nm about the centre is evaluated; with full=False only that box (odd side,
    centred like the grid: the particle's centre is voxel shape // 2 in both) is returned.
    With mirror=True (the solid is symmetric under x -> -x, y -> -y and z -> -z, as all shapes
    here are) only the octant x, y, z >= 0 is evaluated and mirrored, so the result is exactly
    symmetric.
    """
    m = box_half_width(half_extent_nm, grid_size, voxel_nm)
    S = int(supersample)
    spacing = voxel_nm / S
    sub = (np.arange(S) + 0.5) / S - 0.5
    first = 0 if mirror else -m
    coords = ((np.arange(first, m + 1)[:, None] + sub[None, :]) * voxel_nm).ravel()
    n = coords.size
    dist = distance(coords[:, None, None], coords[None, :, None], coords[None, None, :])
    fill = np.clip(0.5 - np.broadcast_to(dist, (n, n, n)) / spacing, 0.0, 1.0)
    width = m + 1 - first
    fill = fill.reshape(width, S, width, S, width, S).mean(axis=(1, 3, 5))
    if mirror:
        fold = np.abs(np.arange(-m, m + 1))
        fill = fill[np.ix_(fold, fold, fold)]
    return _in_grid(fill, grid_size) if full else fill


def box_half_width(half_extent_nm: float, grid_size: int, voxel_nm: float) -> int:
    """Half-width m (voxels) of the box evaluated around the centre; ConfigError if too big."""
    centre = grid_size // 2
    m = int(np.ceil(half_extent_nm / voxel_nm)) + 1
    if centre - m < 0 or centre + m > grid_size - 1:
        raise ConfigError(
            f"a particle of half-width {half_extent_nm:.1f} nm does not fit in the "
            f"{grid_size * voxel_nm:.0f} nm box of a {grid_size}^3 grid of {voxel_nm:.3f} nm voxels"
        )
    return m


def _in_grid(box: np.ndarray, grid_size: int) -> np.ndarray:
    """Place a centred box (odd side) in the middle of an N^3 grid of zeros."""
    m = box.shape[0] // 2
    centre = grid_size // 2
    density = np.zeros((grid_size,) * 3, dtype=np.float64)
    sl = slice(centre - m, centre + m + 1)
    density[sl, sl, sl] = box
    return density


def cube_density(
    edge_nm: float, grid_size: int, voxel_nm: float, supersample: int = 0, full: bool = True
) -> np.ndarray:
    """Axis-aligned cube of edge edge_nm, with exact partial volumes (a product of 1D overlaps).

    ``supersample`` is accepted for symmetry with the other shapes and ignored.
    """
    h = edge_nm / 2.0
    m = box_half_width(h, grid_size, voxel_nm)
    x = np.arange(-m, m + 1) * voxel_nm
    overlap = np.minimum(x + voxel_nm / 2, h) - np.maximum(x - voxel_nm / 2, -h)
    f = np.clip(overlap / voxel_nm, 0.0, 1.0)
    box = f[:, None, None] * f[None, :, None] * f[None, None, :]
    return _in_grid(box, grid_size) if full else box


def superball_density(
    radius_nm: float, p: float, grid_size: int, voxel_nm: float, **kw
) -> np.ndarray:
    """Superball |x|^p + |y|^p + |z|^p <= r^p (p = 2 sphere, p -> inf cube of edge 2r)."""
    r = float(radius_nm)

    def distance(x, y, z):
        # powers of the 1D axes only (separable); coordinates in units of r avoid overflow
        ax = [np.abs(c / r).ravel() for c in (x, y, z)]
        powers = [a**p for a in ax]
        total = (powers[0][:, None, None] + powers[1][None, :, None]) + powers[2][None, None, :]
        # only points within about one sub-point spacing of the surface need a distance
        band = 2.0 * abs(float(x.ravel()[1] - x.ravel()[0])) / r
        lo, hi = max(0.0, 1.0 - band) ** p, (1.0 + band) ** p
        out = np.where(total <= lo, -np.inf, np.inf)
        near = np.nonzero((total > lo) & (total < hi))
        t = total[near]
        norm = t ** (1.0 / p)
        # first-order distance (||u||_p - 1) / |grad ||u||_p|, exact on flat faces and spheres;
        # |grad| = sqrt(sum |u_i|^(2p-2)) / ||u||_p^(p-1), and ||u||_p^(p-1) = total / norm
        grad2 = sum((a ** (2 * p - 2))[i] for a, i in zip(ax, near, strict=True))
        out[near] = r * (norm - 1.0) * t / (norm * np.sqrt(grad2))
        return out

    return voxelise(distance, r, grid_size, voxel_nm, **kw)


def sphere_density(diameter_nm: float, grid_size: int, voxel_nm: float, **kw) -> np.ndarray:
    r = diameter_nm / 2.0

    def distance(x, y, z):
        return np.sqrt((x**2 + y**2) + z**2) - r

    return voxelise(distance, r, grid_size, voxel_nm, **kw)


def dimer_density(sphere_diameter_nm: float, grid_size: int, voxel_nm: float, **kw) -> np.ndarray:
    """Two touching spheres of diameter d along x, centres at x = -d/2 and +d/2."""
    r = sphere_diameter_nm / 2.0

    def distance(x, y, z):
        yz = y**2 + z**2
        return np.sqrt(np.minimum((x - r) ** 2 + yz, (x + r) ** 2 + yz)) - r

    return voxelise(distance, 2.0 * r, grid_size, voxel_nm, **kw)


def rod_density(
    length_nm: float, diameter_nm: float, grid_size: int, voxel_nm: float, **kw
) -> np.ndarray:
    """Cylinder of the given length along z and diameter (a nanorod)."""
    r = diameter_nm / 2.0
    h = length_nm / 2.0

    def distance(x, y, z):
        return np.maximum(np.sqrt(x**2 + y**2) - r, np.abs(z) - h)

    return voxelise(distance, max(h, r), grid_size, voxel_nm, **kw)
