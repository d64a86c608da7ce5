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


def voxel_transfer(q_times_voxel) -> np.ndarray:
    """Transfer function sinc(q v) of averaging a density over voxels of side v, per axis.

    Voxels holding partial volumes (box averages, see shapes.voxelise) multiply the object's
    transform by this on every axis; it is > 0.6 up to the Nyquist frequency (q v = 1/2), so it
    can be divided out.
    """
    return np.sinc(np.asarray(q_times_voxel, dtype=np.float64))


def fft_intensity(density: np.ndarray, box_average: bool = True) -> np.ndarray:
    """|F(q)|^2 of a real-space density on the centred (fftshift) grid of the same size, float64.

    With box_average (the density holds partial volumes) the voxel transfer function is divided
    out, so that the result follows the continuous object's form factor up to the grid's Nyquist
    frequency instead of falling below it at high q.
    """
    amplitude = np.fft.fftshift(np.fft.fftn(density))
    if box_average:
        N = density.shape[0]
        h = voxel_transfer(grid_frequencies(N) / N)
        amplitude /= h[:, None, None] * h[None, :, None] * h[None, None, :]
    return amplitude.real**2 + amplitude.imag**2


def nonzero_box(density: np.ndarray) -> tuple[slice, slice, slice]:
    """The smallest box (slices) holding every nonzero voxel of a 3D array."""
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(np.any(density != 0, axis=other))
        out.append(slice(int(nz[0]), int(nz[-1]) + 1) if nz.size else slice(0, 0))
    return tuple(out)


def intensity_on_grid(
    density: np.ndarray,
    voxel_nm: float,
    q_voxel_inv_nm: float,
    grid_size: int,
    box_average: bool = True,
    unit_voxel_nm: float | None = None,
) -> np.ndarray:
    """|F(q)|^2 of a density on the centred N^3 q grid, q = (i - N // 2) q_voxel_inv_nm.

    The density may sit on a finer real-space grid than 1 / (N q_voxel) (voxel_nm smaller):
    the transform is a separable DFT over the density's nonzero box, evaluated only at the wanted
    q, so a finer grid pushes the aliased copies of the spectrum beyond the detector's q range
    at little cost. F is in units of unit_voxel_nm^3 (default the grid's own voxel
    1 / (N q_voxel)), so results do not depend on the refinement. ``box_average`` divides out
    the voxel transfer function as in fft_intensity. The density's centre is voxel
    shape // 2, as for the grids and boxes of :mod:`spiscape.simulate.shapes`.
    """
    if unit_voxel_nm is None:
        unit_voxel_nm = 1.0 / (grid_size * q_voxel_inv_nm)
    box = nonzero_box(density)
    centre = density.shape[0] // 2
    q = grid_frequencies(grid_size) * q_voxel_inv_nm
    transfer = voxel_transfer(q * voxel_nm) if box_average else None
    if _mirror_symmetric(density, box, centre):
        # every axis folds onto x >= 0 and F is a real cosine transform: several times cheaper
        m = max([centre - sl.start for sl in box] + [sl.stop - 1 - centre for sl in box])
        values = density[(slice(centre, centre + m + 1),) * 3]
        x = np.arange(m + 1) * voxel_nm
        weights = np.where(x > 0, 2.0, 1.0)
        matrix = np.cos(2.0 * np.pi * np.outer(q, x)) * weights
        amplitude = _separable_transform(values, [matrix] * 3, transfer)
    else:
        values = density[box].astype(np.complex128)
        matrices = [
            np.exp(-2j * np.pi * np.outer(q, (np.arange(sl.start, sl.stop) - centre) * voxel_nm))
            for sl in box
        ]
        amplitude = _separable_transform(values, matrices, transfer)
    amplitude *= (voxel_nm / unit_voxel_nm) ** 3
    if np.iscomplexobj(amplitude):
        return amplitude.real**2 + amplitude.imag**2
    return amplitude**2


def _mirror_symmetric(density, box, centre, rtol: float = 1e-12) -> bool:
    """True when flipping any axis about the centre voxel leaves the density unchanged (up to
    rounding)."""
    m = max([centre - sl.start for sl in box] + [sl.stop - 1 - centre for sl in box])
    if centre - m < 0 or centre + m >= density.shape[0]:
        return False
    cube = density[(slice(centre - m, centre + m + 1),) * 3]
    tol = rtol * float(np.abs(cube).max(initial=0.0))
    return all(np.abs(cube - np.flip(cube, axis)).max(initial=0.0) <= tol for axis in range(3))


def _separable_transform(values, matrices, transfer=None):
    """Apply matrices[a] (N, n_a) along axis a of values; divide by transfer on every axis."""
    out = values
    for axis, matrix in enumerate(matrices):
        if transfer is not None:
            matrix = matrix / transfer[:, None]
        # einsum without BLAS: these matrices are small, and BLAS threads only contend
        subscripts = ["qa,ajk->qjk", "qa,iak->iqk", "qa,ija->ijq"][axis]
        out = np.einsum(subscripts, matrix, out)
    return out


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
    return _spirals(np.array([n]))


def _spirals(counts: np.ndarray) -> np.ndarray:
    """Golden-angle spirals of counts[i] unit vectors each, concatenated: (3, sum(counts))."""
    n = np.repeat(counts, counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    i = np.arange(n.size) - np.repeat(starts, counts) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = np.pi * (1.0 + 5**0.5) * i
    rho = np.sqrt(1.0 - z * z)
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z])


def trilinear_weights(points: np.ndarray, grid_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat voxel indices and weights (8, P) of trilinear interpolation at points (3, P) (voxels).

    Corners outside the grid get weight 0 (the grid reads 0 beyond its edges, as in
    sample_volume).
    """
    coords = np.asarray(points, dtype=np.float64) + grid_centre(grid_size)
    base = np.floor(coords).astype(np.int64)
    frac = coords - base
    index = np.empty((8,) + coords.shape[1:], dtype=np.int64)
    weight = np.empty((8,) + coords.shape[1:])
    for corner in range(8):
        offset = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        idx = base + offset[:, None]
        w = np.prod(np.where(offset[:, None] == 1, frac, 1.0 - frac), axis=0)
        inside = np.all((idx >= 0) & (idx < grid_size), axis=0)
        idx = np.clip(idx, 0, grid_size - 1)
        index[corner] = (idx[0] * grid_size + idx[1]) * grid_size + idx[2]
        weight[corner] = np.where(inside, w, 0.0)
    return index, weight


def spherical_average_operator(
    grid_size: int, radii: np.ndarray, points_per_area: float = 0.25, min_points: int = 500
):
    """Sparse matrix (len(radii), N^3): row i averages a flattened intensity grid over the
    sphere |q| = radii[i] (voxels), interpolating trilinearly.

    Applied to an intensity this is its orientation average at |q| = r, i.e. the expected value at
    a pixel of a randomly oriented particle. Each sphere gets points_per_area points per square
    voxel (at least min_points) on a golden-angle spiral; one operator serves every volume.
    """
    from scipy.sparse import csr_matrix

    radii = np.asarray(radii, dtype=np.float64).ravel()
    counts = np.maximum(min_points, np.ceil(points_per_area * 4.0 * np.pi * radii**2)).astype(int)
    rows = np.repeat(np.arange(radii.size), counts)
    points = _spirals(counts) * radii[rows]
    index, weight = trilinear_weights(points, grid_size)
    weight /= counts[rows][None, :]
    return csr_matrix(
        (weight.ravel(), (np.broadcast_to(rows, index.shape).ravel(), index.ravel())),
        shape=(radii.size, grid_size**3),
    )


def spherical_average(volume: np.ndarray, radii: np.ndarray, **kw) -> np.ndarray:
    """Orientation average of one intensity grid at |q| = radii (see spherical_average_operator)."""
    return spherical_average_operator(volume.shape[0], radii, **kw) @ volume.ravel()


def profile_radii(r_max: float, fine_below: float = 8.0) -> np.ndarray:
    """Radii (voxels) on which to tabulate spherical averages for interpolation.

    Steps of 0.05 voxel near the centre, where the intensity falls steeply from its peak, and 0.25
    beyond; linear interpolation between them then costs less than 0.1 % in a frame's total.
    """
    fine = np.arange(0.0, min(fine_below, r_max), 0.05)
    coarse = np.arange(fine_below, r_max + 1.0, 0.25)
    return np.concatenate([fine, coarse])
