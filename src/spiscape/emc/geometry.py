"""The 2D model grid of EMC classification and the in-plane rotations onto it.

Detector pixels are placed on a flat S×S grid as Dragonfly's 2D mode does: pixel t sits at
``c_t = q_t · detd / (qz_t + ewald_rad)`` (the Ewald point projected back onto the detector plane,
in pixels), with the beam at the grid centre ``(S - 1) / 2``. A class model is an S×S image; its
view at in-plane rotation r is the model bilinearly interpolated at ``R(θ_r) c_t``. Both the
view (E-step) and the merge (M-step) use the same four neighbours and weights per (r, t), so the
M-step is the exact adjoint of the view.

Rotations: ``num_rot`` angles over 2π, or over π when Friedel symmetry is on (a centrosymmetric
intensity repeats after π, so the other half of the circle is redundant).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spiscape.errors import ConfigError
from spiscape.io import Detector


def pixel_coords_2d(detector: Detector) -> tuple[np.ndarray, np.ndarray]:
    """Flat-detector coordinates (pixels, beam at 0) of every detector pixel."""
    cx, cy = detector.coords_2d()
    return np.asarray(cx, dtype=np.float64), np.asarray(cy, dtype=np.float64)


def default_grid_size(detector: Detector) -> int:
    """Smallest odd S whose grid holds every non-bad pixel at every in-plane rotation."""
    cx, cy = pixel_coords_2d(detector)
    keep = detector.mask < 2
    radius = float(np.sqrt(cx[keep] ** 2 + cy[keep] ** 2).max())
    return 2 * int(np.ceil(radius)) + 3


def rotation_angles(num_rot: int, friedel: bool) -> np.ndarray:
    if num_rot < 1:
        raise ConfigError(f"num_rot must be at least 1, got {num_rot}")
    span = np.pi if friedel else 2.0 * np.pi
    return np.arange(num_rot) * (span / num_rot)


@dataclass
class RotationTable:
    """Bilinear interpolation of S×S grids at the rotated pixel positions.

    ``index[r, t, k]`` is the flat grid index of the k-th neighbour of pixel t at rotation r and
    ``weight[r, t, k]`` its bilinear weight (weights of a pixel sum to 1).
    """

    size: int
    index: np.ndarray  # (R, P, 4) int64
    weight: np.ndarray  # (R, P, 4) float32

    @property
    def num_rot(self) -> int:
        return self.index.shape[0]

    @property
    def num_pix(self) -> int:
        return self.index.shape[1]


def rotation_table(cx: np.ndarray, cy: np.ndarray, angles: np.ndarray, size: int) -> RotationTable:
    """Neighbours and bilinear weights of points (cx, cy) rotated by each angle on an S×S grid."""
    centre = (size - 1) / 2.0
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    x = cos * cx[None, :] - sin * cy[None, :] + centre
    y = sin * cx[None, :] + cos * cy[None, :] + centre
    if x.min() < 0 or y.min() < 0 or x.max() > size - 1 or y.max() > size - 1:
        raise ConfigError(
            f"model size {size} is too small for the detector: rotated pixels reach "
            f"{max(-x.min(), -y.min(), x.max() - centre, y.max() - centre):.1f} px from the centre"
        )
    x0 = np.minimum(np.floor(x).astype(np.int64), size - 2)
    y0 = np.minimum(np.floor(y).astype(np.int64), size - 2)
    fx, fy = x - x0, y - y0
    index = np.stack(
        [x0 * size + y0, x0 * size + y0 + 1, (x0 + 1) * size + y0, (x0 + 1) * size + y0 + 1],
        axis=-1,
    )
    weight = np.stack(
        [(1 - fx) * (1 - fy), (1 - fx) * fy, fx * (1 - fy), fx * fy], axis=-1
    ).astype(np.float32)
    return RotationTable(size=size, index=index, weight=weight)


def friedel_symmetrize(models):
    """Average each S×S model with its point reflection through the grid centre."""
    return 0.5 * (models + models[..., ::-1, ::-1])
