"""Orientations for 3D EMC: the refined 600-cell sampling of SO(3) (Loh & Elser, Phys. Rev. E 80,
026705 (2009); Dragonfly's ``num_div``), with a weight per orientation.

The 600-cell's 120 vertices are unit quaternions; its 720 edges, 1200 triangular faces and 600
tetrahedral cells tile the 3-sphere. Refinement ``n`` puts points on each simplex at the
barycentric coordinates a / n (a_i ≥ 1 integers summing to n: the points inside it, so each
point belongs to one simplex), then projects them onto the sphere. That gives
120 + 720 (n−1) + 1200 (n−1)(n−2)/2 + 600 (n−1)(n−2)(n−3)/6 = 20 (5n³ + n) points, symmetric under
q → −q, so **10 (5n³ + n) rotations** (n = 4: 3,240; neighbours about 0.94 / n rad apart).

The projection from a cell's flat tetrahedron (at distance h from the origin) to the sphere
stretches solid angle by h / |x|⁴ at the point x before normalisation, so points near a cell's
centre (larger |x|) stand for less of SO(3): each rotation's weight is 1 / |x|⁴, normalised to
sum to 1. With a point group only the rotations in its asymmetric unit are kept (the group's
images of the rest explain a frame equally well once the model is symmetrised).
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np

from spiscape.errors import ConfigError
from spiscape.orient import rotations

_GOLDEN = (1.0 + np.sqrt(5.0)) / 2.0


def count(num_div: int) -> int:
    """Rotations of the refinement ``num_div``: 10 (5 n³ + n)."""
    return 10 * (5 * num_div**3 + num_div)


def _even_permutations():
    for perm in itertools.permutations(range(4)):
        inversions = sum(1 for i in range(4) for j in range(i + 1, 4) if perm[i] > perm[j])
        if inversions % 2 == 0:
            yield perm


@lru_cache(maxsize=1)
def cell600() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 600-cell: vertices (120, 4) and its edges (720, 2), faces (1200, 3) and cells
    (600, 4) as vertex indices."""
    verts = []
    for i in range(4):
        for sign in (1.0, -1.0):
            v = np.zeros(4)
            v[i] = sign
            verts.append(v)
    verts.extend(0.5 * np.array(s) for s in itertools.product((1.0, -1.0), repeat=4))
    base = np.array([_GOLDEN, 1.0, 1.0 / _GOLDEN, 0.0]) / 2.0
    for perm in _even_permutations():
        for signs in itertools.product((1.0, -1.0), repeat=3):
            v = np.zeros(4)
            v[list(perm)] = base * np.array([*signs, 1.0])
            verts.append(v)
    verts = np.unique(np.round(np.array(verts), 12), axis=0)
    # neighbours are 1/φ apart (the edge of a 600-cell of circumradius 1)
    dist = np.linalg.norm(verts[:, None] - verts[None], axis=-1)
    adjacent = np.abs(dist - 1.0 / _GOLDEN) < 1e-6
    edges = np.argwhere(np.triu(adjacent))
    faces = [(i, j, k) for i, j in edges for k in np.flatnonzero(adjacent[i] & adjacent[j])
             if k > j]
    cells = [(i, j, k, m) for i, j, k in faces
             for m in np.flatnonzero(adjacent[i] & adjacent[j] & adjacent[k]) if m > k]
    return verts, edges, np.array(faces), np.array(cells)


def _interior(simplices: np.ndarray, verts: np.ndarray, num_div: int) -> np.ndarray:
    """Points a·v / n strictly inside every simplex (a_i ≥ 1, Σ a_i = n), not normalised."""
    corners = simplices.shape[1]
    combos = [a for a in itertools.product(range(1, num_div + 1), repeat=corners)
              if sum(a) == num_div]
    if not combos:
        return np.zeros((0, 4))
    weights = np.array(combos, dtype=np.float64) / num_div  # (c, corners)
    return np.einsum("ck,skd->scd", weights, verts[simplices]).reshape(-1, 4)


def sample(num_div: int, group: str = "1") -> tuple[np.ndarray, np.ndarray]:
    """Rotations (Q, 4) (scalar first, w ≥ 0) and their weights (Q,) summing to 1, of the
    refinement ``num_div``; with a point group, only those in its asymmetric unit."""
    if not (isinstance(num_div, int | np.integer) and num_div >= 1):
        raise ConfigError(f"num_div must be a positive integer, got {num_div!r}")
    verts, edges, faces, cells = cell600()
    points = np.concatenate([verts] + [_interior(s, verts, num_div)
                                       for s in (edges, faces, cells)])
    # one of each pair q, -q: the first non-zero component positive
    lead = np.array([1.0, 1e-3, 1e-6, 1e-9])
    points = points[points @ lead > 0]
    norms = np.linalg.norm(points, axis=1)
    weights = norms ** -4.0
    quats = rotations.canonical(points / norms[:, None])
    if group not in ("1", "-1"):
        keep = rotations.in_asymmetric_unit(quats, rotations.point_group(group))
        quats, weights = quats[keep], weights[keep]
    return quats, weights / weights.sum()
