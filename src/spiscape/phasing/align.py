"""Aligning phasing starts (shift and centrosymmetric inversion) and the PRTF.

Intensities cannot tell rho(r) from rho(r + s) or from its inversion rho(-r) (the twin; for a real
density the transform is conj(F)), so independent starts land in any of these. Each start is
aligned to a reference by the peak of the FFT cross-correlation with the start and with its twin,
refined to a fraction of a voxel by a parabola through the peak, and shifted by a phase ramp.

PRTF (phase-retrieval transfer function, Chapman et al. 2006): |mean_k F_k(q)| / sqrt(I(q)) over
the aligned starts k, in shells of one voxel of |q| over the measured voxels (as the ratio of the
shell sums of numerator and denominator, so that voxels near zeros of the intensity do not
dominate). It is near 1
where the starts agree on the phases and falls to about 1/sqrt(starts) where they are random;
the resolution is conventionally read where it crosses 1/e.
"""

from __future__ import annotations

import numpy as np

from spiscape.phasing.algorithms import FFT, amplitudes_and_mask, half_spectrum


def _frequencies(xp, shape):
    ks = [xp.fft.fftfreq(n) for n in shape[:-1]] + [xp.fft.rfftfreq(shape[-1])]
    return xp.meshgrid(*ks, indexing="ij")


def _subvoxel_peak(xp, cc):
    """Peak of a periodic map with a parabolic refinement on each axis (voxels, signed)."""
    flat = int(xp.argmax(cc))
    index = np.unravel_index(flat, cc.shape)
    peak = float(cc[index])
    shift = []
    for axis, n in enumerate(cc.shape):
        lo = list(index)
        hi = list(index)
        lo[axis] = (index[axis] - 1) % n
        hi[axis] = (index[axis] + 1) % n
        a, b = float(cc[tuple(lo)]), float(cc[tuple(hi)])
        denom = a - 2.0 * peak + b
        frac = 0.5 * (a - b) / denom if denom < 0 else 0.0
        s = index[axis] + float(np.clip(frac, -0.5, 0.5))
        shift.append(s - n if s > n / 2 else s)
    return np.array(shift), peak


def align_spectrum(xp, fft: FFT, ref_spec, spec):
    """Align one start to a reference in Fourier space.

    Returns (aligned half-spectrum, shift in voxels, inverted?). The aligned density is
    fft.inverse(aligned).
    """
    direct, peak_d = _subvoxel_peak(xp, fft.inverse(ref_spec * xp.conj(spec)))
    twin, peak_t = _subvoxel_peak(xp, fft.inverse(ref_spec * spec))
    inverted = peak_t > peak_d
    if inverted:
        spec, shift = xp.conj(spec), twin
    else:
        shift = direct
    phase = sum(float(s) * k for s, k in zip(shift, _frequencies(xp, fft.shape), strict=True))
    return spec * xp.exp(-2j * np.pi * phase), shift, bool(inverted)


def align_starts(xp, densities, reference: int = 0):
    """Align every start of ``densities (starts, *shape)`` to start ``reference``.

    Returns (aligned densities, aligned half-spectra, shifts (starts, ndim), inverted (starts,)).
    """
    shape = densities.shape[1:]
    fft = FFT(xp, shape)
    specs = fft.forward(densities)
    ref = specs[reference]
    aligned, shifts, flags = [], [], []
    for k in range(densities.shape[0]):
        spec, shift, inverted = align_spectrum(xp, fft, ref, specs[k])
        aligned.append(spec)
        shifts.append(shift)
        flags.append(inverted)
    aligned = xp.stack(aligned)
    return fft.inverse(aligned), aligned, np.array(shifts), np.array(flags)


def centre_density(xp, density):
    """Shift a density (by whole voxels, periodically) so its centre of mass is at n // 2."""
    out = density
    for axis, n in enumerate(density.shape):
        other = tuple(a for a in range(density.ndim) if a != axis)
        profile = xp.sum(xp.maximum(density, 0), axis=other)
        angle = 2 * np.pi * xp.arange(n) / n
        mean = complex(xp.sum(profile * xp.exp(1j * angle)))
        centre = (np.angle(mean) % (2 * np.pi)) * n / (2 * np.pi)
        out = xp.roll(out, int(round(n // 2 - centre)), axis=axis)
    return out


def centred_radius(shape) -> np.ndarray:
    """|q| in voxels of every voxel of a centred grid (q = 0 at n // 2 on every axis)."""
    grids = np.meshgrid(*[np.arange(n) - n // 2 for n in shape], indexing="ij")
    return np.sqrt(sum(g.astype(np.float64) ** 2 for g in grids))


def shell_index(shape):
    """Integer |q| shell (voxels, rounded) of every voxel of rfftn's half-space (NumPy)."""
    grids = [np.fft.fftfreq(n) * n for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1]) * shape[-1]]
    q = np.sqrt(sum(g * g for g in np.meshgrid(*grids, indexing="ij")))
    return np.rint(q).astype(np.int64)


def prtf(xp, aligned_specs, intens, measured=None):
    """PRTF per shell of one voxel: returns (prtf (n_shells,), q_shell (n_shells,) in voxels).

    Shells with no measured voxel read NaN; n_shells runs to the largest measured shell.
    """
    from spiscape.backend import to_numpy

    shape = aligned_specs.shape[1:-1] + ((np.asarray(intens).shape[-1]),)
    amp, mask = amplitudes_and_mask(intens, measured)
    amp_h = to_numpy(half_spectrum(np, amp))
    mask_h = to_numpy(half_spectrum(np, mask)) & (amp_h > 0)
    mean = np.abs(to_numpy(xp.mean(aligned_specs, axis=0)))
    shells = shell_index(shape)
    n_shells = int(shells[mask_h].max()) + 1 if mask_h.any() else 0
    # ratio of shell sums: voxel-wise ratios explode near the zeros of the measured amplitude
    total = np.bincount(shells[mask_h], weights=mean[mask_h], minlength=n_shells)
    expected = np.bincount(shells[mask_h], weights=amp_h[mask_h], minlength=n_shells)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(expected > 0, total / np.where(expected > 0, expected, 1.0), np.nan)
    return values[:n_shells], np.arange(n_shells, dtype=np.float64)


def prtf_resolution(values, q_shell, level: float = 1.0 / np.e):
    """The first shell (q in voxels, beyond the beamstop) where the PRTF drops below ``level``.

    NaN when it never does (resolution limited by the measured q range instead).
    """
    values = np.asarray(values, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(values))
    if finite.size == 0:
        return float("nan")
    for i in finite:
        if values[i] < level and i > finite[0]:
            return float(q_shell[i])
    return float("nan")
