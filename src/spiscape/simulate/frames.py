"""Orientations, Ewald-sphere slicing and photon sampling.

Frame d is a Poisson sample of

    lambda_dt = phi_d * s_d^6 * I(s_d R_d q_t) * corr_t + b_t

at every pixel t: I the particle's 3D intensity, q_t the pixel's point on the Ewald sphere,
R_d the orientation, phi_d the incident fluence, s_d the particle's size factor and b_t the
background. Quaternions are scalar-first (w, x, y, z) and frame d samples I at R_d q_t, i.e. the
rotation acts on the detector's q vectors.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from spiscape.simulate.intensity import grid_centre


def random_quaternions(n: int, rng: np.random.Generator) -> np.ndarray:
    """n uniformly distributed orientations as unit quaternions (w, x, y, z), w >= 0."""
    xyzw = Rotation.random(n, random_state=rng).as_quat()
    quats = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)
    # q and -q are the same rotation; fix the sign so that the stored array is canonical
    quats[quats[:, 0] < 0] *= -1.0
    return quats


def quaternion_to_matrix(quats: np.ndarray) -> np.ndarray:
    """Rotation matrices (n, 3, 3) of scalar-first unit quaternions (n, 4)."""
    quats = np.atleast_2d(np.asarray(quats, dtype=np.float64))
    return Rotation.from_quat(quats[:, [1, 2, 3, 0]]).as_matrix()


def rotated_points(q: np.ndarray, rotations: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Points s_d R_d q_t, shape (3, n, npix), for q (3, npix) and rotations (n, 3, 3)."""
    pts = np.einsum("nij,jt->int", rotations, q)
    pts *= np.asarray(sizes, dtype=np.float64)[None, :, None]
    return pts


def slice_volume(
    volume: np.ndarray, q: np.ndarray, rotations: np.ndarray, sizes: np.ndarray | None = None
) -> np.ndarray:
    """I(s_d R_d q_t) for every frame d and pixel t: one trilinear interpolation for all frames.

    q is (3, npix) in voxels, rotations (n, 3, 3); returns (n, npix). Points outside the grid read
    0 (callers keep the detector inside the grid, see run.check_grid_covers).
    """
    n = rotations.shape[0]
    if sizes is None:
        sizes = np.ones(n)
    coords = rotated_points(q, rotations, sizes)
    coords += grid_centre(volume.shape[0])
    return map_coordinates(
        volume, coords.reshape(3, -1), order=1, mode="constant", cval=0.0, prefilter=False
    ).reshape(n, -1)


def fluence_factors(n: int, shape: float, rng: np.random.Generator) -> np.ndarray:
    """Per-frame fluence phi_d ~ Gamma(shape, mean 1); shape 0 means no jitter (phi = 1)."""
    if shape == 0:
        return np.ones(n)
    return rng.gamma(shape, 1.0 / shape, size=n)


def expected_photons(
    volume: np.ndarray,
    q: np.ndarray,
    corr: np.ndarray,
    rotations: np.ndarray,
    sizes: np.ndarray,
    fluence: np.ndarray,
    background: np.ndarray | None = None,
    bad: np.ndarray | None = None,
) -> np.ndarray:
    """Expected photon counts lambda (n, npix) of frames that share one volume."""
    sizes = np.asarray(sizes, dtype=np.float64)
    lam = slice_volume(volume, q, rotations, sizes)
    lam *= (np.asarray(fluence, dtype=np.float64) * sizes**6)[:, None]
    lam *= corr[None, :]
    if background is not None:
        lam += background[None, :]
    if bad is not None:
        lam[:, bad] = 0.0
    return lam


def sample_photons(lam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poisson counts (int32) with means lam, drawn in C order: chunking does not change them."""
    return rng.poisson(lam).astype(np.int32)
