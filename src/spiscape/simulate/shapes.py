"""Particle densities on an N^3 real-space grid: cubes, superballs, spheres and contaminants.

Every particle has uniform (gold) density 1 inside its surface and is centred on voxel N // 2,
the same index that holds q = 0 after the FFT. Voxels cut by the surface hold the fraction of
their volume inside it, estimated on S^3 sub-points per voxel (supersampling), which suppresses
the aliasing of sharp edges; intensity.fft_intensity removes the small smoothing this causes.

The cube -> sphere melting series is the superball |x|^p + |y|^p + |z|^p <= r^p with p going
log-linearly from p_max (t = 0, a cube with slightly rounded edges) to 2 (t = 1, a sphere) while
the volume grows linearly, V(t) = a^3 (1 + growth t), as it does when a gold nanocube melts into
a sphere.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import gammaln

from spiscape.errors import ConfigError

#: sub-points per voxel and axis used to estimate partial volumes
DEFAULT_SUPERSAMPLE = 4


def superball_volume(r, p):
    """Volume of |x|^p + |y|^p + |z|^p <= r^p: 8 r^3 Gamma(1 + 1/p)^3 / Gamma(1 + 3/p)."""
    p = np.asarray(p, dtype=np.float64)
    return 8.0 * np.asarray(r, dtype=np.float64) ** 3 * np.exp(
        3.0 * gammaln(1.0 + 1.0 / p) - gammaln(1.0 + 3.0 / p)
    )


def superball_exponent(t, p_max: float = 12.0):
    """Exponent p of the melting series: log-linear from p_max at t = 0 to 2 at t = 1."""
    t = np.asarray(t, dtype=np.float64)
    return np.exp((1.0 - t) * np.log(p_max) + t * np.log(2.0))


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


def supersample_transfer(k, grid_size: int, supersample: int) -> np.ndarray:
    """Fourier transfer function of averaging S sub-points per voxel, at grid frequency k.

    Averaging f over sub-points at offsets delta_j multiplies its transform by
    H(k) = (1/S) sum_j cos(2 pi k delta_j / N) per axis (delta_j in voxels, symmetric about 0).
    H > 0 for |k| <= N/2, so it can be divided out.
    """
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    k = np.asarray(k, dtype=np.float64)
    return np.mean(np.cos(2.0 * np.pi * np.multiply.outer(k, offsets) / grid_size), axis=-1)


def voxelise(
    inside: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    half_extent_nm: float,
    grid_size: int,
    voxel_nm: float,
    supersample: int = DEFAULT_SUPERSAMPLE,
) -> np.ndarray:
    """Fill fraction of every voxel for the solid ``inside(x, y, z)`` (coordinates in nm).

    ``inside`` receives broadcastable 1D coordinate arrays (shapes (n,1,1), (1,n,1), (1,1,n)) and
    returns a boolean array; only the cube of half-width half_extent_nm about the centre is
    evaluated, so the cost does not grow with the grid.
    """
    centre = grid_size // 2
    m = int(np.ceil(half_extent_nm / voxel_nm)) + 1
    if centre - m < 0 or centre + m > grid_size - 1:
        raise ConfigError(
            f"a particle of half-width {half_extent_nm:.1f} nm does not fit in the "
            f"{grid_size}^3 grid of {voxel_nm:.3f} nm voxels; raise grid_size"
        )
    S = int(supersample)
    sub = (np.arange(S) + 0.5) / S - 0.5
    coords = ((np.arange(-m, m + 1)[:, None] + sub[None, :]) * voxel_nm).ravel()
    n = coords.size
    fill = inside(coords[:, None, None], coords[None, :, None], coords[None, None, :])
    fill = np.broadcast_to(fill, (n, n, n)).astype(np.float32)
    width = 2 * m + 1
    fill = fill.reshape(width, S, width, S, width, S).mean(axis=(1, 3, 5), dtype=np.float64)
    density = np.zeros((grid_size,) * 3, dtype=np.float64)
    sl = slice(centre - m, centre + m + 1)
    density[sl, sl, sl] = fill
    return density


def cube_density(edge_nm: float, grid_size: int, voxel_nm: float, **kw) -> np.ndarray:
    """Axis-aligned cube of edge edge_nm."""
    h = edge_nm / 2.0

    def inside(x, y, z):
        return (np.abs(x) <= h) & (np.abs(y) <= h) & (np.abs(z) <= h)

    return voxelise(inside, h, grid_size, voxel_nm, **kw)


def superball_density(
    radius_nm: float, p: float, grid_size: int, voxel_nm: float, **kw
) -> np.ndarray:
    """Superball |x|^p + |y|^p + |z|^p <= r^p (p = 2 sphere, p -> inf cube of edge 2r)."""
    rp = radius_nm**p

    def inside(x, y, z):
        # separable: the powers are taken on the 1D axes, only the sum is 3D
        return (np.abs(x) ** p + np.abs(y) ** p) + np.abs(z) ** p <= rp

    return voxelise(inside, radius_nm, grid_size, voxel_nm, **kw)


def sphere_density(diameter_nm: float, grid_size: int, voxel_nm: float, **kw) -> np.ndarray:
    return superball_density(diameter_nm / 2.0, 2.0, grid_size, voxel_nm, **kw)


def dimer_density(sphere_diameter_nm: float, grid_size: int, voxel_nm: float, **kw) -> np.ndarray:
    """Two touching spheres of diameter d along x, centres at x = -d/2 and +d/2."""
    r = sphere_diameter_nm / 2.0
    r2 = r * r

    def inside(x, y, z):
        yz = y**2 + z**2
        return ((x - r) ** 2 + yz <= r2) | ((x + r) ** 2 + yz <= r2)

    return voxelise(inside, 2.0 * r, grid_size, voxel_nm, **kw)


def rod_density(
    length_nm: float, diameter_nm: float, grid_size: int, voxel_nm: float, **kw
) -> np.ndarray:
    """Cylinder of the given length along z and diameter (a nanorod)."""
    r2 = (diameter_nm / 2.0) ** 2
    h = length_nm / 2.0

    def inside(x, y, z):
        return (x**2 + y**2 <= r2) & (np.abs(z) <= h)

    return voxelise(inside, max(h, diameter_nm / 2.0), grid_size, voxel_nm, **kw)
