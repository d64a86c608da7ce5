"""Rotations for orienting 2D class averages: a near-uniform SO(3) grid, point groups, the
asymmetric unit and the misorientation between two orientations modulo a point group.

Convention (the simulator's, see :mod:`spiscape.io.truth`): unit quaternions scalar first
(w, x, y, z) with w >= 0; an average with orientation R shows I(R q) at its grid points' q, so
when I(g q) = I(q) for every g of the point group G, R and g R are the same orientation (left
cosets G R). Friedel's law (I(-q) = I(q)) makes an average at R look like the one at R Rz(pi)
(rotated by 180 degrees in plane) up to the curvature of the Ewald sphere, which is why
:func:`misorientation_deg` can also forgive a right factor Rz(pi).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.spatial.transform import Rotation

from spiscape.errors import ConfigError

# psi: the real root of psi^4 = psi + 4 (Alexa, "Super-Fibonacci spirals", CVPR 2022)
_PHI = np.sqrt(2.0)
_PSI = 1.533751168755204288118041

# the bi-invariant volume of SO(3) when distance is the rotation angle (radians)
SO3_VOLUME = 8.0 * np.pi**2

POINT_GROUPS = ("1", "-1", "222", "mmm", "432", "m-3m")


def canonical(quats) -> np.ndarray:
    """Unit quaternions (n, 4) with w >= 0 (q and -q are the same rotation)."""
    q = np.atleast_2d(np.asarray(quats, dtype=np.float64))
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., :1] < 0, -q, q)


def multiply(a, b) -> np.ndarray:
    """Hamilton product a b of scalar-first quaternions, broadcast over leading axes."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], axis=-1)


def conjugate(q) -> np.ndarray:
    """Inverse of unit quaternions."""
    q = np.array(q, dtype=np.float64)
    q[..., 1:] *= -1.0
    return q


def to_matrix(quats) -> np.ndarray:
    """Rotation matrices (n, 3, 3) of scalar-first quaternions (n, 4)."""
    q = np.atleast_2d(np.asarray(quats, dtype=np.float64))
    return Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()


def from_matrix(matrices) -> np.ndarray:
    """Scalar-first quaternions (n, 4), w >= 0, of rotation matrices (n, 3, 3)."""
    xyzw = Rotation.from_matrix(np.asarray(matrices, dtype=np.float64).reshape(-1, 3, 3)).as_quat()
    return canonical(xyzw[:, [3, 0, 1, 2]])


def from_rotvec(rotvecs) -> np.ndarray:
    """Scalar-first quaternions (n, 4) of rotation vectors (n, 3) (axis times angle, radians)."""
    xyzw = Rotation.from_rotvec(np.atleast_2d(rotvecs)).as_quat()
    return canonical(xyzw[:, [3, 0, 1, 2]])


def angle_deg(quats) -> np.ndarray:
    """Rotation angle in degrees of each quaternion (the distance to the identity)."""
    w = np.abs(np.asarray(quats, dtype=np.float64)[..., 0])
    return np.degrees(2.0 * np.arccos(np.clip(w, 0.0, 1.0)))


def super_fibonacci(n: int) -> np.ndarray:
    """n near-uniform rotations (n, 4): Alexa's super-Fibonacci spiral, deterministic."""
    s = np.arange(n, dtype=np.float64) + 0.5
    r = np.sqrt(s / n)
    big_r = np.sqrt(1.0 - s / n)
    alpha = 2.0 * np.pi * s / _PHI
    beta = 2.0 * np.pi * s / _PSI
    q = np.stack([r * np.sin(alpha), r * np.cos(alpha), big_r * np.sin(beta),
                  big_r * np.cos(beta)], axis=1)
    return canonical(q)


def grid_count(step_deg: float) -> int:
    """Number of rotations of a full SO(3) grid whose cells are cubes of side step_deg."""
    if not step_deg > 0:
        raise ConfigError(f"rotation grid step must be positive, got {step_deg}")
    return max(1, int(round(SO3_VOLUME / np.radians(step_deg) ** 3)))


def so3_grid(step_deg: float) -> np.ndarray:
    """A deterministic near-uniform grid over all of SO(3), about step_deg between neighbours."""
    return super_fibonacci(grid_count(step_deg))


def point_group(name: str) -> np.ndarray:
    """The proper rotations (G, 4) of a point group, identity first.

    Intensities are centrosymmetric (Friedel), so a centrosymmetric group acts on them like its
    rotation subgroup: m-3m like 432 (24 rotations of the cube), mmm like 222, -1 like 1.
    """
    if name in ("1", "-1"):
        return np.array([[1.0, 0.0, 0.0, 0.0]])
    if name in ("222", "mmm"):
        return np.eye(4)
    if name in ("432", "m-3m"):
        mats = []
        for perm in itertools.permutations(range(3)):
            for signs in itertools.product((1.0, -1.0), repeat=3):
                m = np.zeros((3, 3))
                m[np.arange(3), perm] = signs
                if np.linalg.det(m) > 0:
                    mats.append(m)
        quats = from_matrix(np.array(mats))
        order = np.argsort(-quats[:, 0], kind="stable")  # identity (w = 1) first
        return quats[order]
    raise ConfigError(f"unknown point group '{name}' (known: {', '.join(POINT_GROUPS)})")


def _orbit_w(quats: np.ndarray, group: np.ndarray) -> np.ndarray:
    """|w| of g q for every q (n, 4) and g (G, 4): (n, G). (g q).w = g . (q_w, -q_v)."""
    return np.abs(conjugate(quats) @ group.T)


def in_asymmetric_unit(quats, group: np.ndarray) -> np.ndarray:
    """True for rotations that are their orbit's representative: the g q closest to the identity
    (largest |w|; ties go to the identity, so a boundary rotation is kept)."""
    w = _orbit_w(np.atleast_2d(quats), group)
    return w[:, 0] >= w.max(axis=1) - 1e-12


def asymmetric_unit(quats, group: np.ndarray) -> np.ndarray:
    """The rotations of a grid that lie in the asymmetric unit (fundamental zone) of the group."""
    quats = np.atleast_2d(quats)
    return quats[in_asymmetric_unit(quats, group)]


def reduce(quats, group: np.ndarray) -> np.ndarray:
    """Each rotation's equivalent g q in the fundamental zone (closest to the identity), w >= 0."""
    quats = np.atleast_2d(np.asarray(quats, dtype=np.float64))
    best = np.argmax(_orbit_w(quats, group), axis=1)
    return canonical(multiply(group[best], quats))


def misorientation_deg(q1, q2, group: np.ndarray | None = None, friedel: bool = False):
    """Smallest angle (degrees) between orientations q1 and q2 (n, 4) modulo the point group.

    The distance between R1 and the equivalents g R2 (g in group), and also g R2 Rz(pi) with
    friedel (an average and its 180-degree in-plane rotation look alike). Symmetric in q1, q2
    and zero for equivalent pairs.
    """
    q1 = np.atleast_2d(np.asarray(q1, dtype=np.float64))
    q2 = np.atleast_2d(np.asarray(q2, dtype=np.float64))
    if group is None:
        group = point_group("1")
    rights = [np.array([1.0, 0.0, 0.0, 0.0])]
    if friedel:
        rights.append(np.array([0.0, 0.0, 0.0, 1.0]))  # Rz(pi)
    best = np.zeros(np.broadcast_shapes(q1.shape, q2.shape)[:-1])
    for h in rights:
        # angle(R1^-1 g R2 h) = angle(g R2 h R1^-1) (conjugation by R1): one product per g
        rel = multiply(multiply(q2, h), conjugate(q1))
        w = np.abs(conjugate(rel) @ group.T).max(axis=-1)
        best = np.maximum(best, w)
    return np.degrees(2.0 * np.arccos(np.clip(best, 0.0, 1.0)))


def local_grid(spacing_deg: float, radius_deg: float) -> np.ndarray:
    """Small rotations (n, 4) around the identity: a cubic grid of rotation vectors with the
    given spacing inside a ball of the given radius; the identity comes first."""
    m = int(np.floor(radius_deg / spacing_deg + 1e-9))
    k = np.arange(-m, m + 1, dtype=np.float64) * spacing_deg
    vecs = np.stack(np.meshgrid(k, k, k, indexing="ij"), axis=-1).reshape(-1, 3)
    vecs = vecs[np.linalg.norm(vecs, axis=1) <= radius_deg + 1e-9]
    vecs = vecs[np.argsort(np.linalg.norm(vecs, axis=1), kind="stable")]
    return from_rotvec(np.radians(vecs))
