"""3D diffraction intensities: |FFT|^2 of densities, and analytic form factors.

Grid convention: ``intens[i, j, k]`` is the intensity at q = (i - c, j - c, k - c) voxels,
c = N // 2 (the FFT's zero frequency after fftshift), one voxel being dq = 1 / L for a real-space
box of side L. For even N the grid runs from -N/2 to N/2 - 1.

A particle scaled by s has the intensity I_s(q) = s^6 I(s q), which is how size spreads are
simulated without recomputing the FFT.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import map_coordinates

from spiscape.simulate.shapes import supersample_transfer


def grid_centre(grid_size: int) -> int:
    """Index of q = 0 along each axis of an N^3 intensity grid."""
    return grid_size // 2


def safe_radius(grid_size: int) -> int:
    """Largest |q| (voxels) that trilinear interpolation can reach in every direction."""
    c = grid_centre(grid_size)
    return min(c, grid_size - 1 - c)


def grid_frequencies(grid_size: int) -> np.ndarray:
    """q (voxels) along one axis of the grid: -c, ..., N - 1 - c."""
    return np.arange(grid_size) - grid_centre(grid_size)


def fft_intensity(density: np.ndarray, supersample: int | None = None) -> np.ndarray:
    """|F(q)|^2 of a real-space density on the centred (fftshift) grid, float64.

    With ``supersample`` (the S used to voxelise the density) the transfer function of the
    sub-point averaging is divided out, so that the result follows the continuous object's form
    factor up to the grid's Nyquist frequency instead of falling below it at high q.
    """
    amplitude = np.fft.fftshift(np.fft.fftn(density))
    if supersample:
        N = density.shape[0]
        h = supersample_transfer(grid_frequencies(N), N, supersample)
        amplitude /= h[:, None, None] * h[None, :, None] * h[None, None, :]
    return amplitude.real**2 + amplitude.imag**2


def sphere_form_factor(q, radius):
    """Amplitude of a uniform sphere normalised to 1 at q = 0: 3 (sin x - x cos x) / x^3.

    x = 2 pi q R, with q and 1/R in the same units (e.g. 1/nm and nm).
    """
    x = 2.0 * np.pi * np.asarray(q, dtype=np.float64) * radius
    out = np.ones_like(x)
    nz = np.abs(x) > 1e-6
    xs = x[nz]
    out[nz] = 3.0 * (np.sin(xs) - xs * np.cos(xs)) / xs**3
    return out


def cube_form_factor(q, edge):
    """Amplitude of an axis-aligned cube normalised to 1 at q = 0: prod_i sinc(q_i a).

    q has shape (..., 3); np.sinc(x) = sin(pi x) / (pi x).
    """
    q = np.asarray(q, dtype=np.float64)
    return np.prod(np.sinc(q * edge), axis=-1)


def sample_volume(volume: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of a centred intensity grid at points (3, ...) in voxel units.

    Points beyond the grid read 0.
    """
    c = grid_centre(volume.shape[0])
    coords = np.asarray(points, dtype=np.float64) + c
    return map_coordinates(volume, coords, order=1, mode="constant", cval=0.0, prefilter=False)


def fibonacci_sphere(n: int) -> np.ndarray:
    """n nearly uniform unit vectors (3, n) on the sphere (golden-angle spiral)."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = np.pi * (1.0 + 5**0.5) * i
    rho = np.sqrt(1.0 - z * z)
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z])


def spherical_average(
    volume: np.ndarray, radii: np.ndarray, points_per_area: float = 2.0
) -> np.ndarray:
    """Mean of the trilinearly interpolated intensity over spheres of the given radii (voxels).

    This is the orientation average of the intensity at |q| = r, i.e. the expected intensity at a
    pixel of a randomly oriented particle. Each sphere gets about points_per_area points per
    square voxel (at least 64), placed on a golden-angle spiral.
    """
    radii = np.asarray(radii, dtype=np.float64)
    out = np.empty(radii.shape)
    for i, r in enumerate(radii.ravel()):
        n = max(64, int(np.ceil(points_per_area * 4.0 * np.pi * r * r)))
        out.flat[i] = sample_volume(volume, r * fibonacci_sphere(n)).mean()
    return out
