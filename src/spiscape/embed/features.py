"""Rotation-invariant features of a 2D class average, the input of the absolute-embedding regressor.

A class average is known only up to an in-plane rotation (EMC classes are defined modulo
rotation), so the regressor must see something that does not change when the average turns. On
each ring of radius ``r`` (pixels from the beam) the image is sampled at ``num_angles`` equally
spaced angles; a rotation shifts every ring cyclically, which changes the phases of its Fourier
series along the angle and not the moduli. The features are those moduli:

* computed from the logarithm of the intensity (the speckle contrast spans decades), after
  dividing the average by its mean over the rings used, so that an overall gain (fluence, class
  scale) drops out exactly;
* odd angular harmonics dropped: intensities are centrosymmetric (Friedel), so a ring is
  pi-periodic and odd harmonics hold only noise;
* harmonics beyond what a ring resolves dropped: a circle of radius ``r`` crosses about
  ``2 pi r`` pixels, so only harmonics ``n <= pi r`` carry information (Nyquist).

Only rings lying (almost) entirely inside the measured support are used; the few unmeasured
samples left on such a ring are filled with the ring's mean. The harmonic ``n = 0`` of each ring is
the radial profile (log scale), which carries the particle's size and shape fringes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage


@dataclass
class FeatureParams:
    """Everything needed to compute the same features again (stored with the regressor)."""

    size: int
    radii: list[int] = field(default_factory=list)
    num_angles: int = 0
    eps: float = 1e-3

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FeatureParams:
        return cls(size=int(data["size"]), radii=[int(r) for r in data["radii"]],
                   num_angles=int(data["num_angles"]), eps=float(data["eps"]))

    @property
    def harmonics(self) -> list[np.ndarray]:
        """The angular harmonics kept at each radius: even, ``n <= pi r`` and below Nyquist."""
        top = self.num_angles // 2
        return [np.arange(0, min(int(np.floor(np.pi * r)), top) + 1, 2) for r in self.radii]

    @property
    def num_features(self) -> int:
        return int(sum(h.size for h in self.harmonics))


def ring_points(size: int, radii, num_angles: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid coordinates ``(x, y)`` of shape ``(R, num_angles)`` of the ring samples."""
    centre = (size - 1) / 2.0
    theta = 2.0 * np.pi * np.arange(num_angles) / num_angles
    r = np.asarray(radii, dtype=np.float64)[:, None]
    return centre + r * np.cos(theta), centre + r * np.sin(theta)


def ring_coverage(support: np.ndarray, radii, num_angles: int) -> np.ndarray:
    """Fraction of each ring's samples that fall on measured grid points (nearest neighbour)."""
    x, y = ring_points(support.shape[0], radii, num_angles)
    inside = ndimage.map_coordinates(support.astype(np.float64), [x, y], order=0, mode="constant")
    return inside.mean(axis=1)


def choose_params(support: np.ndarray, min_coverage: float = 0.9, r_min: int = 2,
                  eps: float = 1e-3) -> FeatureParams:
    """Radii and angular sampling from the averages' support.

    The number of angles is a multiple of 4 (so a 90 degree turn is an exact cyclic shift) at
    least ``2 pi r_max``; rings with less than ``min_coverage`` of their samples measured are
    left out (the beamstop, the corners beyond the detector's edge).
    """
    support = np.asarray(support, dtype=bool)
    size = support.shape[0]
    r_max = int(np.floor((size - 1) / 2.0))
    num_angles = int(4 * np.ceil(2 * np.pi * max(r_max, 1) / 4))
    radii = np.arange(max(1, r_min), r_max + 1)
    coverage = ring_coverage(support, radii, num_angles)
    kept = [int(r) for r, c in zip(radii, coverage, strict=True) if c >= min_coverage]
    return FeatureParams(size=size, radii=kept, num_angles=num_angles, eps=eps)


def polar_rings(intens: np.ndarray, support: np.ndarray, params: FeatureParams) -> np.ndarray:
    """Ring samples ``(A, R, num_angles)`` of each average, unmeasured samples set to NaN."""
    x, y = ring_points(params.size, params.radii, params.num_angles)
    measured = ndimage.map_coordinates(np.asarray(support, dtype=np.float64), [x, y], order=0,
                                       mode="constant") > 0.5
    rings = np.empty((intens.shape[0],) + x.shape)
    for a in range(intens.shape[0]):
        rings[a] = ndimage.map_coordinates(np.asarray(intens[a], dtype=np.float64), [x, y],
                                           order=1, mode="constant")
    rings[:, ~measured] = np.nan
    return rings


def ring_features(rings: np.ndarray, params: FeatureParams) -> np.ndarray:
    """Features ``(A, F)`` from ring samples (NaN = unmeasured), see the module docstring."""
    rings = np.array(rings, dtype=np.float64)
    count = rings.shape[0]
    ring_mean = np.nanmean(np.where(np.isfinite(rings), np.clip(rings, 0, None), np.nan), axis=2)
    ring_mean = np.nan_to_num(ring_mean)
    missing = ~np.isfinite(rings)
    rings[missing] = np.broadcast_to(ring_mean[:, :, None], rings.shape)[missing]
    rings = np.clip(rings, 0.0, None)
    scale = rings.reshape(count, -1).mean(axis=1)
    scale = np.where(scale > 0, scale, 1.0)[:, None, None]
    logs = np.log(rings / scale + params.eps)
    logs -= logs.reshape(count, -1).mean(axis=1)[:, None, None]
    moduli = np.abs(np.fft.rfft(logs, axis=2)) / params.num_angles
    parts = [moduli[:, k, h] for k, h in enumerate(params.harmonics)]
    return np.concatenate(parts, axis=1) if parts else np.zeros((count, 0))


def rotation_invariant_features(intens, support=None, params: FeatureParams | None = None):
    """Features of the averages ``intens (A, S, S)``; returns ``(features, params)``.

    ``support (S, S)`` marks measured grid points (everything when None); ``params`` fixes the
    rings and sampling (chosen from the support when None, as at training time).
    """
    intens = np.asarray(intens)
    if intens.ndim == 2:
        intens = intens[None]
    if support is None:
        support = np.ones(intens.shape[1:], dtype=bool)
    if params is None:
        params = choose_params(support)
    if intens.shape[1:] != (params.size, params.size):
        raise ValueError(f"averages of {intens.shape[1]}x{intens.shape[2]} pixels, features "
                         f"defined on {params.size}x{params.size}")
    if not params.radii:
        raise ValueError("no ring of the grid lies inside the measured support")
    return ring_features(polar_rings(intens, support, params), params), params
