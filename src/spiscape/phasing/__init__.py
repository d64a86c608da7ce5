"""Phase retrieval of 3D intensity volumes and 2D class averages, and particle volumes.

:func:`phase_pattern` runs the recipe on several random starts at once, keeps those whose final
error is within twice the best and whose aligned density agrees with the best's (CC >=
``agree_cc``), averages them and measures the PRTF. A start that stagnates (a twin mixture, a
collapsed support) is not always recognisable by its error alone when every start of a batch
failed, but failed starts never agree with each other (aligned CC 0.4-0.6 against 0.89-0.98 for
converged starts of a VAE volume): fewer than ``min_agree`` agreeing starts and another batch is
phased, up to ``max_rounds``; ``converged`` says whether that was reached.

:mod:`.volume` turns a density into a particle volume (from the signed average: its negative
ringing is part of the band-limited image and of its mass). See :mod:`.algorithms` for the
update rules and conventions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

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

log = logging.getLogger(__name__)
_ROUND_SEED = 1_000_003  # seed offset of each further batch of starts

__all__ = [
    "DEFAULT_RECIPE",
    "agreeing",
    "densities_agree",
    "PhasingParams",
    "PhasingResult",
    "measured_shell_mask",
    "parse_recipe",
    "phase_from_start",
    "phase_pattern",
    "reproduced",
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
    converged: bool = True  # at least min_agree starts agree (see the module docstring)
    rounds: int = 1  # batches of ``starts`` phased


def measured_shell_mask(shape, q_min: float = 0.0, q_max: float = np.inf) -> np.ndarray:
    """Mask of the centred grid voxels with q_min <= |q| <= q_max (voxels, q = 0 at n // 2)."""
    q = centred_radius(shape)
    return (q >= q_min) & (q <= q_max)


def phase_pattern(intens, params: PhasingParams, xp=np, measured=None) -> PhasingResult:
    """Phase one centred intensity pattern (2D or 3D) from ``params.starts`` random starts."""
    need = min(params.min_agree, params.starts)
    densities = supports = errors = None
    for rounds in range(1, max(params.max_rounds, 1) + 1):
        batch = replace(params, seed=params.seed + _ROUND_SEED * (rounds - 1))
        d, s, e = Phaser(intens, batch, xp=xp, measured=measured).run()
        densities = d if densities is None else xp.concatenate([densities, d])
        supports = s if supports is None else xp.concatenate([supports, s])
        errors = e if errors is None else xp.concatenate([errors, e], axis=1)
        kept = select_starts(to_numpy(errors[-1]) if errors.shape[0] else None,
                             densities.shape[0])
        aligned, specs, _, inverted = align_starts(xp, densities[kept])
        agree = agreeing(xp, aligned, params.agree_cc)
        if agree.sum() >= need:
            break
    log.log(logging.DEBUG if agree.sum() >= need else logging.WARNING,
            "phasing: %d of %d starts agree with the best (CC >= %.2f) after %d round(s)%s",
            int(agree.sum()), densities.shape[0], params.agree_cc, rounds,
            "" if agree.sum() >= need else "; the result rests on one start")
    sel = np.flatnonzero(agree)
    return result_from_aligned(xp, np.asarray(kept)[sel], supports, aligned[sel], specs[sel],
                               np.asarray(inverted)[sel], errors, intens, measured,
                               converged=bool(agree.sum() >= need), rounds=rounds)


def result_from_aligned(xp, kept, supports, aligned, specs, inverted, errors, intens, measured,
                        converged: bool, rounds: int) -> PhasingResult:
    """The PhasingResult of the aligned starts ``kept`` (the reference first): their average,
    clipped and centred, the reference's support moved with it, and the PRTF."""
    supports = supports[kept]
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
        converged=converged,
        rounds=rounds,
    )


def phase_from_start(intens, params: PhasingParams, start, support, xp=np, measured=None,
                     reference=None, agree_cc: float | None = None,
                     agree_sigma: float = 0.0) -> PhasingResult:
    """Refine one or more given starts ``(starts, *shape)`` within ``support`` with
    ``params.recipe`` (no random starts). ``converged``: the refined density agrees with
    ``reference`` (e.g. the network's prediction; aligned CC >= ``agree_cc``, default
    ``params.agree_cc``, both blurred by a Gaussian of ``agree_sigma`` voxels first: a
    reference of lower resolution is compared at its own), or True without a reference."""
    ph = Phaser(intens, params, xp=xp, measured=measured)
    d, s, e = ph.run(start=start, support=support)
    kept = select_starts(to_numpy(e[-1]) if e.shape[0] else None, d.shape[0])
    aligned, specs, _, inverted = align_starts(xp, d[kept])
    converged = True
    if reference is not None:
        pair = xp.stack([aligned[0], xp.asarray(reference, dtype=aligned.dtype)])
        if agree_sigma > 0:
            pair = ph.blur(pair, agree_sigma)
        threshold = params.agree_cc if agree_cc is None else agree_cc
        converged = densities_agree(pair[0], pair[1], threshold, xp=xp)[0]
    res = result_from_aligned(xp, kept, s, aligned, specs, inverted, e, intens, measured,
                              converged=converged, rounds=1)
    if len(kept) == 1:  # the PRTF of one start is only its Fourier-magnitude fit
        res.prtf = np.full_like(res.prtf, np.nan)
        res.resolution_q = float("nan")
    return res


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


def reference_cc(xp, aligned) -> np.ndarray:
    """Pearson CC of each aligned density (the reference first) with the reference."""
    flat = aligned.reshape(aligned.shape[0], -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norm = xp.sqrt(xp.sum(flat * flat, axis=1))
    return to_numpy(flat @ flat[0] / xp.maximum(norm * norm[0], 1e-30))


def agreeing(xp, aligned, threshold: float) -> np.ndarray:
    """Which aligned starts (the reference first) agree with the reference: Pearson CC of the
    densities >= ``threshold``. The reference always agrees with itself."""
    out = reference_cc(xp, aligned) >= threshold
    out[0] = True
    return out


def densities_agree(a, b, threshold: float, xp=np) -> tuple[bool, float]:
    """Whether two phased densities of one pattern are the same solution: Pearson CC >=
    ``threshold`` once ``b`` is aligned to ``a`` (shift and twin, as starts are); and the CC."""
    aligned, _, _, _ = align_starts(xp, xp.stack([xp.asarray(a, dtype=xp.float32),
                                                  xp.asarray(b, dtype=xp.float32)]))
    cc = float(reference_cc(xp, aligned)[1])
    return cc >= threshold, cc


def reproduced(result: PhasingResult, others, volume: float, typical: float,
               threshold: float, xp=np) -> float | None:
    """Whether a pattern whose support error stays an outlier of its curve after re-phasing is
    nevertheless a solution: its own starts agree (``converged``), another phasing of it that
    converged (other seeds: :func:`spiscape.phasing.algorithms.independent_params`) lands on
    the same density (:func:`densities_agree`), and its volume is within a factor 2 of the
    curve's ``typical`` one (a collapsed support holds a tenth of the particle, and starts can
    collapse alike). Then the high error is the intensities' own: the decoded intensities at
    that latent are not one object's (blurred fringes), not a stagnated phasing. Returns the
    best aligned CC with such a phasing, None when not reproduced."""
    if not result.converged or not (np.isfinite(volume) and volume > 0):
        return None
    if np.isfinite(typical) and typical > 0 and not 0.5 * typical <= volume <= 2.0 * typical:
        return None
    best = None
    for other in others:
        if other is result or not other.converged:
            continue
        agree, cc = densities_agree(result.density, other.density, threshold, xp=xp)
        if agree and (best is None or cc > best):
            best = cc
    return best


def _integer_shift(before, after):
    """The whole-voxel roll that maps ``before`` onto ``after`` (both from centre_density)."""
    spec = np.fft.fftn(after) * np.conj(np.fft.fftn(before))
    cc = np.fft.ifftn(spec).real
    idx = np.unravel_index(int(np.argmax(cc)), cc.shape)
    return tuple(int(i) for i in idx)
