"""Phase retrieval of 3D intensity volumes and 2D class averages, and particle volumes.

:func:`phase_pattern` runs the recipe on several random starts at once, keeps those whose final
error is within twice the best, aligns them (shift and inversion) to the best, averages them and
measures the PRTF; :mod:`.volume` turns a density into a particle volume (from the signed
average: its negative ringing is part of the band-limited image and of its mass). See
:mod:`.algorithms` for the update rules and conventions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spiscape.backend import to_numpy
from spiscape.phasing.algorithms import DEFAULT_RECIPE, Phaser, PhasingParams, parse_recipe
from spiscape.phasing.align import (
    align_starts,
    centre_density,
    centred_radius,
    prtf,
    prtf_resolution,
)

__all__ = [
    "DEFAULT_RECIPE",
    "PhasingParams",
    "PhasingResult",
    "measured_shell_mask",
    "parse_recipe",
    "phase_pattern",
]


@dataclass
class PhasingResult:
    density: np.ndarray  # aligned average of the starts, centred, non-negative
    support: np.ndarray  # bool, support of the reference start moved with the density
    prtf: np.ndarray  # (n_shells,)
    prtf_q: np.ndarray  # (n_shells,) shell |q| in voxels
    resolution_q: float  # shell (voxels) where the PRTF crosses 1/e, NaN if it never does
    errors: np.ndarray  # (iterations, starts) support error, every start
    inverted: np.ndarray  # (kept,) which averaged starts were twins of the reference
    kept: np.ndarray | None = None  # indices of the starts averaged, the reference first
    signed_density: np.ndarray | None = None  # ``density`` before clipping its negative ringing


def measured_shell_mask(shape, q_min: float = 0.0, q_max: float = np.inf) -> np.ndarray:
    """Mask of the centred grid voxels with q_min <= |q| <= q_max (voxels, q = 0 at n // 2)."""
    q = centred_radius(shape)
    return (q >= q_min) & (q <= q_max)


def phase_pattern(intens, params: PhasingParams, xp=np, measured=None) -> PhasingResult:
    """Phase one centred intensity pattern (2D or 3D) from ``params.starts`` random starts."""
    phaser = Phaser(intens, params, xp=xp, measured=measured)
    densities, supports, errors = phaser.run()
    kept = select_starts(to_numpy(errors[-1]) if errors.shape[0] else None, densities.shape[0])
    densities, supports = densities[kept], supports[kept]  # the best start first
    aligned, specs, _, inverted = align_starts(xp, densities)
    signed = xp.mean(aligned, axis=0)
    mean = xp.maximum(signed, 0)
    values, q = prtf(xp, specs, intens, measured)
    # centre the average for figures; move the reference's support the same way
    density = to_numpy(mean)
    centred = to_numpy(centre_density(xp, mean))
    support = to_numpy(supports[0])
    shift = _integer_shift(density, centred)
    axes = tuple(range(support.ndim))
    support = np.roll(support, shift, axis=axes)
    signed = np.roll(to_numpy(signed), shift, axis=axes)
    return PhasingResult(
        density=centred.astype(np.float32),
        support=support,
        prtf=values,
        prtf_q=q,
        resolution_q=prtf_resolution(values, q),
        errors=to_numpy(errors),
        inverted=inverted,
        kept=np.asarray(kept),
        signed_density=signed.astype(np.float32),
    )


def select_starts(final_errors, starts: int, factor: float = 2.0) -> np.ndarray:
    """Indices of the starts averaged: final support error within ``factor`` of the best.

    A start that stagnated (a twin mixture, or an offset filling a loose support) has an error
    several times the converged ones and would blur the average; the best start comes first
    and is the reference of the alignment.
    """
    if final_errors is None:
        return np.arange(starts)
    err = np.nan_to_num(np.asarray(final_errors, dtype=np.float64), nan=np.inf)
    order = np.argsort(err, kind="stable")
    best = err[order[0]]
    return order[err[order] <= factor * best + 1e-6]


def _integer_shift(before, after):
    """The whole-voxel roll that maps ``before`` onto ``after`` (both from centre_density)."""
    spec = np.fft.fftn(after) * np.conj(np.fft.fftn(before))
    cc = np.fft.ifftn(spec).real
    idx = np.unravel_index(int(np.argmax(cc)), cc.shape)
    return tuple(int(i) for i in idx)
