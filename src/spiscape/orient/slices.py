"""Ewald slices of a reference 3D intensity at the grid points of a 2D class average.

Geometry (Dragonfly's convention, q in voxels = detector pixels at the centre): grid point
(i, j) of an S x S average sits at flat-detector coordinates (cx, cy) = (i - c, j - c),
c = (S - 1) / 2, first axis = detector x; with D the detector distance in pixels and E the
Ewald radius, fac = sqrt(cx^2 + cy^2 + D^2) and q = (cx E / fac, cy E / fac, E (D / fac - 1)).
An average with orientation R shows I(R q). Physical q (1/nm) = q (voxels) x q_per_pixel.

References: an analytic cube (edge, nm) or sphere (diameter, nm) evaluated exactly at the
rotated q, or a 3D intensity grid (HDF5 ``intens (N, N, N)`` centred on voxel N // 2, attribute
``q_per_voxel_inv_nm``) interpolated trilinearly. Every function takes the array module ``xp``
(NumPy, or CuPy on a GPU) so that slicing runs where the correlation runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from spiscape.errors import ConfigError, InputError
from spiscape.io.hdf5 import open_input

log = logging.getLogger(__name__)

REFERENCE_KINDS = ("cube", "sphere")


def ewald_points(size: int, detd: float, ewald_rad: float) -> np.ndarray:
    """q (S * S, 3) in voxels of every grid point of an S x S average, row-major (i, j)."""
    c = (size - 1) / 2.0
    cx, cy = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    fac = np.sqrt(cx**2 + cy**2 + float(detd) ** 2)
    q = np.stack([cx * ewald_rad / fac, cy * ewald_rad / fac, ewald_rad * (detd / fac - 1.0)],
                 axis=-1)
    return q.reshape(-1, 3)


@dataclass
class AnalyticReference:
    """|F(q)|^2 of an ideal cube (size_nm = edge) or sphere (size_nm = diameter), 1 at q = 0."""

    kind: str
    size_nm: float
    q_per_pixel: float  # 1/nm per voxel of the Ewald points

    def __post_init__(self):
        if self.kind not in REFERENCE_KINDS:
            raise ConfigError(f"unknown reference '{self.kind}' (known: cube, sphere, or a file)")
        if not self.size_nm > 0:
            raise ConfigError(f"reference size must be positive, got {self.size_nm} nm")
        if not self.q_per_pixel > 0:
            raise ConfigError(f"q per pixel must be positive, got {self.q_per_pixel}")

    @property
    def isotropic(self) -> bool:
        return self.kind == "sphere"

    def intensity(self, points, xp=np):
        """I at points (3, ...) in voxels; same formulas as spiscape.simulate.intensity."""
        if self.kind == "cube":
            # prod_i sinc(q_i a), written out: np.sinc is several times slower
            x = points * (np.pi * self.q_per_pixel * self.size_nm)
            amplitude = None
            for axis in range(3):
                xi = x[axis]
                zero = xp.abs(xi) < 1e-6
                xs = xp.where(zero, 1.0, xi)
                factor = xp.where(zero, 1.0, xp.sin(xs) / xs)
                amplitude = factor if amplitude is None else amplitude * factor
        else:
            x = xp.sqrt(xp.sum(points * points, axis=0)) * (
                np.pi * self.q_per_pixel * self.size_nm)  # 2 pi q R, R = diameter / 2
            small = x < 1e-4
            xs = xp.where(small, 1.0, x)
            amplitude = xp.where(small, 1.0 - x * x / 10.0,
                                 3.0 * (xp.sin(xs) - xs * xp.cos(xs)) / xs**3)
        return amplitude * amplitude

    def describe(self) -> str:
        what = "edge" if self.kind == "cube" else "diameter"
        return f"ideal {self.kind}, {what} {self.size_nm:g} nm"


@dataclass
class VolumeReference:
    """A 3D intensity grid centred on voxel N // 2, interpolated trilinearly (0 outside)."""

    intens: np.ndarray
    q_per_voxel: float  # 1/nm per voxel of the grid
    q_per_pixel: float  # 1/nm per voxel of the Ewald points
    path: str = ""
    kind: str = "file"
    size_nm: float = float("nan")
    isotropic: bool = False

    def intensity(self, points, xp=np):
        centre = self.intens.shape[0] // 2
        coords = points * (self.q_per_pixel / self.q_per_voxel) + centre
        shape = coords.shape[1:]
        coords = coords.reshape(3, -1)
        if xp is np:
            from scipy.ndimage import map_coordinates

            volume = self.intens
        else:  # pragma: no cover - GPU only
            from cupyx.scipy.ndimage import map_coordinates

            volume = self._device_volume(xp)
        out = map_coordinates(volume, coords, order=1, mode="constant", cval=0.0,
                              prefilter=False)
        return out.reshape(shape)

    def _device_volume(self, xp):  # pragma: no cover - GPU only
        if getattr(self, "_gpu", None) is None:
            self._gpu = xp.asarray(self.intens)
        return self._gpu

    def reach(self) -> float:
        """Largest |q| (voxels of the Ewald points) inside the grid in every direction."""
        n = self.intens.shape[0]
        return min(n // 2, n - 1 - n // 2) * self.q_per_voxel / self.q_per_pixel

    def describe(self) -> str:
        return f"3D intensity {self.path} ({self.intens.shape[0]}^3)"


def read_reference_volume(path: str | os.PathLike, q_per_pixel: float,
                          model: int | None = None) -> VolumeReference:
    """Read ``intens (N, N, N)`` — or model ``model`` of ``intens (K, N, N, N)``, as
    ``spiscape emc3d`` writes — and its ``q_per_voxel_inv_nm`` attribute; InputError if
    unfit."""
    with open_input(path, "a 3D intensity file") as f:
        if "intens" not in f:
            raise InputError(path, "no dataset 'intens' (a 3D intensity N x N x N)")
        dset = f["intens"]
        shape = dset.shape
        if dset.ndim == 4 and len(set(shape[1:])) == 1:
            if model is None or not 0 <= model < shape[0]:
                raise InputError(path, f"holds {shape[0]} models: choose one with a model "
                                       f"number from 0 to {shape[0] - 1}")
        elif model is not None:
            raise InputError(path, f"'intens' {shape} holds one volume: no model {model}")
        elif dset.ndim != 3 or len(set(shape)) != 1:
            raise InputError(path, f"'intens' must be a cube N x N x N, got {shape}")
        if "q_per_voxel_inv_nm" not in dset.attrs and "q_per_voxel_inv_nm" not in f.attrs:
            raise InputError(path, "no attribute 'q_per_voxel_inv_nm' on 'intens' or the "
                             "file (the grid's q step in 1/nm)")
        attrs = dset.attrs if "q_per_voxel_inv_nm" in dset.attrs else f.attrs
        q_per_voxel = float(attrs["q_per_voxel_inv_nm"])
        intens = np.asarray(dset[()] if model is None else dset[model], dtype=np.float64)
    if not q_per_voxel > 0:
        raise InputError(path, f"q_per_voxel_inv_nm must be positive, got {q_per_voxel}")
    if not np.all(np.isfinite(intens)):
        raise InputError(path, "'intens' holds NaN or infinite values")
    return VolumeReference(intens=intens, q_per_voxel=q_per_voxel, q_per_pixel=q_per_pixel,
                           path=str(path))


def rotated_slices(reference, points, rotations, xp=np):
    """I(R_r q_p) for rotation matrices (R, 3, 3) and points (P, 3): (R, P) on xp's device."""
    # single precision: q reaches a few tens of voxels, far inside float32's accuracy, and
    # the transcendental functions run twice as fast; axis-first so each component is contiguous
    rotations = xp.asarray(rotations, dtype=xp.float32)
    points_t = xp.asarray(np.ascontiguousarray(np.asarray(points).T), dtype=xp.float32)  # (3, P)
    rotated = xp.stack([rotations[:, i, :] @ points_t for i in range(3)])  # (3, R, P)
    return reference.intensity(rotated, xp)
