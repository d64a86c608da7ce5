"""Slicing 3D models on the detector's Ewald sphere and merging back: one sparse operator per
block of orientations, so that the merge is exactly the adjoint (transpose) of the slice.

Detector pixel t has the scattering vector q_t (voxels of the model grid, Ewald curvature
included: the detector file's ``qx qy qz``). The view of a model M at orientation R is
W_t = M(R q_t), read by trilinear interpolation around the grid centre ``V // 2``. For a block
of B orientations the operator E (B·P × V³) has 8 entries per row; ``views = E @ M`` and the merge
of per-pixel values ``E.T @ v``. Points beyond the grid read 0 (the grid is sized so none is).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.sparse

from spiscape.errors import InputError
from spiscape.orient import rotations
from spiscape.phasing.align import centred_radius


def grid_size(q: np.ndarray) -> int:
    """Smallest odd V whose grid holds every pixel's q (3, P) at every orientation, with the
    one voxel trilinear interpolation reads beyond it."""
    radius = float(np.sqrt((np.asarray(q) ** 2).sum(axis=0)).max())
    return 2 * int(np.ceil(radius)) + 3


def operator(quats: np.ndarray, q: np.ndarray, size: int) -> scipy.sparse.csr_matrix:
    """The slice operator (B·P × V³, float32) of orientations ``quats`` (B, 4) for pixels at
    ``q`` (3, P) on a V = ``size`` grid; rows ``b·P + t``."""
    mats = rotations.to_matrix(quats)  # (B, 3, 3)
    coords = np.einsum("bij,jp->bpi", mats, q).reshape(-1, 3) + size // 2
    base = np.floor(coords).astype(np.int64)
    frac = coords - base
    if base.min() < 0 or base.max() > size - 2:
        raise InputError(None, f"pixels reach beyond the {size}^3 grid: grid too small for "
                               "the detector")
    rows, cols, vals = [], [], []
    row = np.arange(len(coords))
    for corner in range(8):
        offset = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        idx = base + offset
        weight = np.prod(np.where(offset == 1, frac, 1.0 - frac), axis=1)
        rows.append(row)
        cols.append((idx[:, 0] * size + idx[:, 1]) * size + idx[:, 2])
        vals.append(weight)
    op = scipy.sparse.csr_matrix(
        (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(coords), size**3))
    op.sum_duplicates()
    return op


def views(op, models: np.ndarray, num_pix: int) -> np.ndarray:
    """Views (P, B·K) of K models (K, V³) for a block's operator: column ``b·K + k``."""
    flat = op @ models.reshape(models.shape[0], -1).T  # (B·P, K)
    num_orient = flat.shape[0] // num_pix
    return flat.reshape(num_orient, num_pix, -1).transpose(1, 0, 2).reshape(num_pix, -1)


def merge(op, values: np.ndarray, num_models: int) -> np.ndarray:
    """Adjoint of :func:`views`: values (P, B·K) summed onto the grid, (K, V³)."""
    num_pix = values.shape[0]
    per_orient = values.reshape(num_pix, -1, num_models).transpose(1, 0, 2)
    return (op.T @ per_orient.reshape(-1, num_models)).T


def symmetrize(models: np.ndarray, group: str) -> np.ndarray:
    """The average of each model (K, V, V, V) over the point group's rotations about the grid
    centre (432: the 24 signed axis permutations, exact on the grid; 222: the 4 axis flips) and
    Friedel's inversion."""
    out = 0.5 * (models + models[:, ::-1, ::-1, ::-1])
    if group in ("1", "-1"):
        return out
    total = np.zeros_like(out)
    mats = np.rint(rotations.to_matrix(rotations.point_group(group))).astype(int)
    for m in mats:
        # M'(x) = M(g x): axis i of the result reads axis perm[i] of M, flipped where g is -1
        perm = [int(np.flatnonzero(m[i])[0]) for i in range(3)]
        rotated = np.transpose(out, (0, *(p + 1 for p in perm)))
        flips = tuple(i + 1 for i in range(3) if m[i, perm[i]] < 0)
        total += np.flip(rotated, axis=flips) if flips else rotated
    return total / len(mats)


@lru_cache(maxsize=4)
def _grid_points(size: int) -> np.ndarray:
    """Every voxel's position about the centre of a size³ grid, (3, size³), read-only (the
    rotation searches turn one volume hundreds of times)."""
    axis = np.arange(size, dtype=np.float64) - size // 2
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij")).reshape(3, -1)
    grid.flags.writeable = False
    return grid


def rotate(volume: np.ndarray, quat: np.ndarray) -> np.ndarray:
    """V(x) → V(R x) about the grid centre (trilinear; 0 beyond the grid)."""
    from scipy.ndimage import map_coordinates

    size = volume.shape[0]
    coords = rotations.to_matrix(quat)[0] @ _grid_points(size) + size // 2
    return map_coordinates(volume, coords, order=1, mode="constant", cval=0.0,
                           prefilter=False).reshape(volume.shape)


def align_to_group(model: np.ndarray, group: str, coarse_div: int = 4) -> tuple[np.ndarray,
                                                                                   float]:
    """The rotation R (quaternion) for which V(R x) is most symmetric under the point group
    about the grid axes: the share of its (log-intensity, mean-free) power that symmetrising
    keeps, searched over the group's asymmetric unit of the refined 600-cell ``coarse_div``,
    then on two finer local grids around the best. Returns (R, that share)."""
    logm = np.log(np.maximum(model, 1e-6 * model.max()))
    size = model.shape[0]
    radius = centred_radius(model.shape)
    inside = (radius <= size // 2 - 1) & (radius >= 1)

    def score(quat):
        v = rotate(logm, quat[None])
        v = np.where(inside, v - v[inside].mean(), 0.0)
        s = symmetrize(v[None], group)[0]
        return float((s * s).sum() / max((v * v).sum(), 1e-30))

    return _coarse_to_fine(score, group, coarse_div)


def _coarse_to_fine(score, group: str, coarse_div: int) -> tuple[np.ndarray, float]:
    """:func:`search_rotation` on the refined 600-cell ``coarse_div``, then local grids of a
    quarter and a sixteenth of twice its spacing (about 54°/n)."""
    spacing = np.degrees(0.94 / coarse_div) * 2
    return search_rotation(score, coarse_div, group, (spacing / 4, spacing / 16))


def anisotropic_share(model: np.ndarray, group: str, q_range: tuple[float, float],
                      coarse_div: int = 4) -> float:
    """How much of a model's anisotropy the point group explains: its log intensity less each
    shell's mean, over the shells ``q_range`` (voxels), turned to the rotation at which
    symmetrising under ``group`` keeps the largest share of that power (the refined 600-cell
    ``coarse_div`` in the group's asymmetric unit, then two finer local grids); that share. An
    isotropic model's anisotropy is noise, which a group of order g keeps about 1/g of (2/g for
    a Friedel-symmetric model and a centrosymmetric group, m-3m: 1/24); the multi-model 3D EMC
    reads a model as cubic when m-3m keeps at least half (:data:`spiscape.emc3d.run.CUBIC_SHARE`).
    """
    logm = np.log(np.maximum(model, 1e-6 * model.max()))
    radius = centred_radius(model.shape)
    shells = np.rint(radius).astype(np.int64)
    profile = np.bincount(shells.ravel(), logm.ravel()) / np.bincount(shells.ravel())
    inside = (radius >= q_range[0]) & (radius <= q_range[1])
    aniso = np.where(inside, logm - profile[shells], 0.0)

    def score(quat):
        v = np.where(inside, rotate(aniso, quat[None]), 0.0)
        sym = symmetrize(v[None], group)[0]
        return float((sym * sym).sum() / max((v * v).sum(), 1e-30))

    return _coarse_to_fine(score, group, coarse_div)[1]


def search_rotation(score, num_div: int, group: str, steps) -> tuple[np.ndarray, float]:
    """The rotation (quaternion) maximising ``score(quat)``: over the refined 600-cell
    ``num_div`` (the group's asymmetric unit), then on a local grid of each of ``steps``
    (degrees, radius two steps) around the best so far. Returns (rotation, its score)."""
    from spiscape.emc3d import quaternions

    candidates, _ = quaternions.sample(num_div, group)
    scores = [score(q) for q in candidates]
    best = candidates[int(np.argmax(scores))]
    top = max(scores)
    for step in steps:
        local = rotations.local_grid(step, 2 * step)
        trial = rotations.canonical(rotations.multiply(local, best[None]))
        values = [score(q) for q in trial]
        if max(values) > top:
            top, best = max(values), trial[int(np.argmax(values))]
    return best, top
