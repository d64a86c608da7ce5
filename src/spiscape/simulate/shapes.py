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
    """Fourier transfer function of the voxel averaging at grid frequency k (cycles per box).

    The fill fractions made by voxelise are, up to a small residual, box averages of the solid
    over each voxel, whose transfer function per axis is sinc(k / N). (Exact point sub-sampling
    with S points at symmetric offsets delta_j would give (1/S) sum_j cos(2 pi k delta_j / N);
    supersample=1 gives 1, i.e. point sampling.) H > 0 for |k| <= N/2, so it can be divided out.
    """
    k = np.asarray(k, dtype=np.float64)
    if supersample == 1:
        return np.ones_like(k)
    return np.sinc(k / grid_size)


def voxelise(
    distance: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    half_extent_nm: float,
    grid_size: int,
    voxel_nm: float,
    supersample: int = DEFAULT_SUPERSAMPLE,
) -> np.ndarray:
    """Fill fraction of every voxel for the solid {distance(x, y, z) <= 0} (coordinates in nm).

    ``distance`` is a signed distance to the surface in nm (negative inside; an estimate is
    enough near the surface) evaluated on broadcastable 1D coordinate arrays (shapes (n,1,1),
    (1,n,1), (1,1,n)) of S sub-points per voxel and axis. Each sub-point contributes
    clip(1/2 - distance / spacing, 0, 1) rather than 0 or 1: a ramp one sub-point spacing wide
    makes the sum exact for a plane at any offset, so flat faces do not snap to the sub-grid
    and the fill fractions are the voxels' partial volumes. Only the cube of half-width
    half_extent_nm about the centre is evaluated.
    """
    centre = grid_size // 2
    m = int(np.ceil(half_extent_nm / voxel_nm)) + 1
    if centre - m < 0 or centre + m > grid_size - 1:
        raise ConfigError(
            f"a particle of half-width {half_extent_nm:.1f} nm does not fit in the "
            f"{grid_size}^3 grid of {voxel_nm:.3f} nm voxels; raise grid_size"
        )
    S = int(supersample)
    spacing = voxel_nm / S
    sub = (np.arange(S) + 0.5) / S - 0.5
    coords = ((np.arange(-m, m + 1)[:, None] + sub[None, :]) * voxel_nm).ravel()
    n = coords.size
    dist = distance(coords[:, None, None], coords[None, :, None], coords[None, None, :])
    fill = np.clip(0.5 - np.broadcast_to(dist, (n, n, n)) / spacing, 0.0, 1.0)
    width = 2 * m + 1
    fill = fill.reshape(width, S, width, S, width, S).mean(axis=(1, 3, 5))
    density = np.zeros((grid_size,) * 3, dtype=np.float64)
    sl = slice(centre - m, centre + m + 1)
    density[sl, sl, sl] = fill
    return density


def cube_density(edge_nm: float, grid_size: int, voxel_nm: float, **kw) -> np.ndarray:
    """Axis-aligned cube of edge edge_nm."""
    h = edge_nm / 2.0

    def distance(x, y, z):
        return np.maximum(np.maximum(np.abs(x), np.abs(y)), np.abs(z)) - h

    return voxelise(distance, h, grid_size, voxel_nm, **kw)


def superball_density(
    radius_nm: float, p: float, grid_size: int, voxel_nm: float, **kw
) -> np.ndarray:
    """Superball |x|^p + |y|^p + |z|^p <= r^p (p = 2 sphere, p -> inf cube of edge 2r)."""
    r = float(radius_nm)

    def distance(x, y, z):
        # powers of the 1D axes only (separable); coordinates in units of r avoid overflow
        ax = [np.abs(c / r) for c in (x, y, z)]
        total = (ax[0] ** p + ax[1] ** p) + ax[2] ** p
        norm = total ** (1.0 / p)
        # first-order distance: (||u||_p - 1) / |grad ||u||_p|, exact on flat faces and spheres
        grad = np.sqrt((ax[0] ** (2 * p - 2) + ax[1] ** (2 * p - 2)) + ax[2] ** (2 * p - 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            grad = grad / norm ** (p - 1)
        grad = np.where(norm > 0.5, grad, 1.0)
        return r * (norm - 1.0) / grad

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
