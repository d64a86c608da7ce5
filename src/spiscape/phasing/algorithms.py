"""Iterative phase retrieval: projections, DM / RAAR / HIO / ER, recipes and shrink-wrap.

Conventions
-----------
Intensities arrive on the centred grid of the other stages (q = 0 at index n // 2 on every axis,
1D, 2D or 3D); they are moved to FFT order once (``ifftshift``) and only the half-space of
``rfftn`` is kept, since the density is real and its transform Hermitian. The measured amplitude
is sqrt(max(I, 0)); voxels that were not measured (NaN, beyond the detector's q range, behind the
beamstop, or masked by the caller) are left free by the Fourier projection.

Several random starts are phased at once as a batch ``(starts, *grid)``: every operation acts on
the last ``ndim`` axes, so one call keeps a GPU busy and the CPU path is the same code. The array
module is NumPy or CuPy (:func:`spiscape.backend.get_array_module`); on NumPy the FFTs go through
``scipy.fft`` to use several threads.

Update rules (P_M the Fourier-magnitude projection, P_S the support-and-positivity projection,
rho the iterate):

``ER``    rho <- P_S P_M rho
``HIO``   p = P_M rho; rho <- p inside S where p > 0, rho - beta p elsewhere (Fienup 1982)
``DM``    rho <- rho + P_S(2 P_M rho - rho) - P_M rho (Elser 2003 with beta = 1, the form used
          by Dragonfly's phaser; one Fourier projection per iteration)
``RAAR``  rho <- beta (rho + P_S(2 p - rho) - p) + (1 - beta) p, p = P_M rho (Luke 2005)

The solution estimate of every algorithm is P_S P_M rho; the density returned is that estimate
without its (unconstrained) components beyond the outermost measured |q|.

Starts are the measured amplitudes with random phases (free voxels zero) on the initial support:
the central peak of the autocorrelation (unmeasured voxels zero), enlarged twice about the centre.
Shrink-wrap (Marchesini et al. 2003): every ``shrinkwrap_every`` iterations the support becomes
{blur_sigma(P_S P_M rho) >= threshold * max} within the initial support (so it cannot grow to
absorb an offset), sigma falling geometrically from ``sigma_start`` to ``sigma_end`` and the
threshold linearly from ``shrinkwrap_threshold_start`` to ``shrinkwrap_threshold`` over the
updates; it is off during the last stage of a recipe, so that a closing ER stage refines the
density on a fixed support.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from spiscape.errors import ConfigError

ALGORITHMS = ("DM", "RAAR", "HIO", "ER")
DEFAULT_RECIPE = "100 DM 100 RAAR 100 ER"


def parse_recipe(text: str) -> list[tuple[int, str]]:
    """Parse a recipe like ``"100 DM 50 ER"`` into [(100, "DM"), (50, "ER")].

    Pairs of a positive iteration count and an algorithm name (case-insensitive); ConfigError with
    the offending word otherwise.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("phasing recipe is empty; write e.g. '100 DM 50 ER'")
    words = text.replace(",", " ").split()
    if len(words) % 2:
        raise ConfigError(
            f"phasing recipe {text!r}: expected pairs '<iterations> <algorithm>', "
            f"got an odd number of words"
        )
    stages = []
    for count, name in zip(words[::2], words[1::2], strict=True):
        if not re.fullmatch(r"\d+", count) or int(count) <= 0:
            raise ConfigError(
                f"phasing recipe {text!r}: {count!r} is not a positive iteration count"
            )
        if name.upper() not in ALGORITHMS:
            raise ConfigError(
                f"phasing recipe {text!r}: unknown algorithm {name!r} "
                f"(choose from {', '.join(ALGORITHMS)})"
            )
        stages.append((int(count), name.upper()))
    return stages


@dataclass
class PhasingParams:
    """Settings of one phasing run (all from config)."""

    recipe: str = DEFAULT_RECIPE
    starts: int = 8
    seed: int = 1
    beta: float = 0.9  # HIO and RAAR feedback
    positivity: bool = True
    shrinkwrap_every: int = 20
    shrinkwrap_threshold: float = 0.15  # fraction of the blurred maximum, at the last update
    shrinkwrap_threshold_start: float = 0.3  # ... at the first update (linear in between)
    sigma_start: float = 3.0  # voxels
    sigma_end: float = 1.0
    initial_support_threshold: float = 0.02  # of the (lightly blurred) autocorrelation's peak
    initial_support_scale: float = 2.0  # enlargement of the autocorrelation's central peak
    initial_support_dilation: int = 1  # voxels added around it
    # a result is trusted when min_agree starts (the best included) agree: aligned density CC
    # with the best >= agree_cc; otherwise up to max_rounds batches of ``starts`` are pooled
    min_agree: int = 2
    agree_cc: float = 0.8
    max_rounds: int = 3


class FFT:
    """rfftn / irfftn over the last ``ndim`` axes for NumPy (scipy.fft, threaded) or CuPy."""

    def __init__(self, xp, shape):
        self.xp = xp
        self.shape = tuple(shape)
        self.axes = tuple(range(-len(shape), 0))
        if xp is np:
            import scipy.fft

            self._mod = scipy.fft
            self._kw = {"workers": -1}
        else:
            self._mod = xp.fft
            self._kw = {}

    def forward(self, rho):
        return self._mod.rfftn(rho, axes=self.axes, **self._kw)

    def inverse(self, spectrum):
        return self._mod.irfftn(spectrum, s=self.shape, axes=self.axes, **self._kw)


def half_spectrum(xp, centred):
    """A centred grid (q = 0 at n // 2) in the FFT order of rfftn's half-space."""
    arr = xp.fft.ifftshift(xp.asarray(centred))
    return arr[..., : arr.shape[-1] // 2 + 1]


def frequency_sq(xp, shape):
    """|k|^2 in cycles per voxel on rfftn's half-space grid of ``shape``."""
    ks = [xp.fft.fftfreq(n) for n in shape[:-1]] + [xp.fft.rfftfreq(shape[-1])]
    grids = xp.meshgrid(*ks, indexing="ij")
    return sum(g * g for g in grids)


def amplitudes_and_mask(intens, measured=None):
    """Measured amplitude sqrt(max(I, 0)) and the measured mask (finite and, if given, measured)."""
    intens = np.asarray(intens, dtype=np.float64)
    mask = np.isfinite(intens)
    if measured is not None:
        mask &= np.asarray(measured, dtype=bool)
    amp = np.sqrt(np.clip(np.where(mask, intens, 0.0), 0.0, None))
    return amp, mask


class Phaser:
    """Phase a batch of random starts of one intensity pattern (1D, 2D or 3D, centred grid)."""

    def __init__(self, intens, params: PhasingParams, xp=np, measured=None):
        self.xp = xp
        self.params = params
        self.stages = parse_recipe(params.recipe)
        amp, mask = amplitudes_and_mask(intens, measured)
        if not mask.any():
            raise ConfigError("no measured intensity to phase")
        self.shape = amp.shape
        self.fft = FFT(xp, self.shape)
        self.amp = half_spectrum(xp, amp.astype(np.float32))
        self.mask = half_spectrum(xp, mask)
        self.k2 = frequency_sq(xp, self.shape).astype(xp.float32)
        self.errors: list[float] = []

    # -- projections -------------------------------------------------------------------------
    def project_fourier(self, rho):
        xp = self.xp
        spec = self.fft.forward(rho)
        mag = xp.abs(spec)
        scaled = spec * (self.amp / xp.maximum(mag, 1e-30))
        spec = xp.where(self.mask, scaled, spec)
        return self.fft.inverse(spec).astype(rho.dtype)

    def project_support(self, rho, support):
        keep = support & (rho > 0) if self.params.positivity else support
        return self.xp.where(keep, rho, 0).astype(rho.dtype)

    def band_limit(self, rho):
        """Remove the Fourier components beyond the outermost measured |q|.

        Nothing constrains them but support and positivity, which leave a band of free modes
        that fill the particle's interior with grid-scale fluctuations (the corners of the
        Fourier cube beyond the detector's edge); the density is reported at the resolution
        of the data. The free low-q voxels (beamstop) are kept: they hold the particle's mass.
        """
        xp = self.xp
        k2_max = float(xp.max(xp.where(self.mask, self.k2, 0)))
        spec = self.fft.forward(rho)
        spec = xp.where(self.k2 <= k2_max * (1 + 1e-6), spec, 0)
        return self.fft.inverse(spec).astype(rho.dtype)

    def blur(self, rho, sigma: float):
        """Gaussian blur of width sigma voxels (periodic, via the FFT)."""
        xp = self.xp
        transfer = xp.exp(-2.0 * np.pi**2 * sigma**2 * self.k2).astype(xp.float32)
        return self.fft.inverse(self.fft.forward(rho) * transfer).astype(rho.dtype)

    def threshold_support(self, rho, sigma: float, fraction: float):
        xp = self.xp
        blurred = self.blur(xp.maximum(rho, 0), sigma)
        axes = tuple(range(1, blurred.ndim))
        peak = xp.max(blurred, axis=axes, keepdims=True)
        return blurred >= fraction * peak

    def initial_support(self):
        """Support from the autocorrelation (Patterson map, unmeasured voxels set to 0).

        The autocorrelation of an object is zero beyond twice the object's extent, so its
        support, shifted to be centred on the grid, contains the object (placed about the
        centre). Without the low-q voxels the map is the autocorrelation minus a smooth
        low-pass version of it: a central peak on a negative moat, with positive ripples
        beyond. The support is the connected region about the centre where the lightly
        blurred map exceeds ``initial_support_threshold`` of its peak; the ripples, which
        are not connected to it, are dropped.
        """
        from scipy import ndimage

        from spiscape.backend import to_numpy

        xp = self.xp
        patterson = self.fft.inverse(xp.where(self.mask, self.amp**2, 0).astype(xp.complex64))
        patterson = xp.fft.fftshift(self.blur(patterson[None], 1.0)[0])
        above = to_numpy(patterson >= self.params.initial_support_threshold
                         * xp.max(patterson))
        labels, _ = ndimage.label(above)
        centre = labels[tuple(n // 2 for n in self.shape)]
        core = labels == centre if centre else above
        # the central peak is about the object's own size (the moat cuts the rest): enlarge it
        # about the centre by initial_support_scale (2: the autocorrelation's extent)
        scale = float(self.params.initial_support_scale)
        grids = np.meshgrid(*[np.arange(n) - n // 2 for n in self.shape], indexing="ij")
        index = tuple(
            np.clip(np.rint(g / scale).astype(np.int64) + n // 2, 0, n - 1)
            for g, n in zip(grids, self.shape, strict=True)
        )
        support = core[index]
        if self.params.initial_support_dilation > 0:
            support = ndimage.binary_dilation(
                support, iterations=self.params.initial_support_dilation
            )
        return xp.asarray(support)

    def random_start(self, rng, supports):
        """Random starts: the measured amplitudes with random phases, projected on the support.

        Unmeasured voxels (q = 0 among them) start at zero, so a start carries no offset of its
        own, and its scale is the data's: a uniform-noise start puts most of its power in the
        free low-q voxels, which only the support constraint can then remove.
        """
        xp = self.xp
        shape = (self.params.starts,) + tuple(self.amp.shape)
        phase = xp.asarray(rng.random(shape, dtype=np.float32)) * np.float32(2 * np.pi)
        spec = xp.where(self.mask, self.amp, 0) * xp.exp(1j * phase)
        rho = self.fft.inverse(spec.astype(xp.complex64)).astype(xp.float32)
        return self.project_support(rho, supports)

    def shrinkwrap_schedule(self, update: int, n_updates: int):
        """(blur sigma, threshold fraction) of shrink-wrap update ``update`` of ``n_updates``.

        Sigma falls geometrically from sigma_start to sigma_end and the threshold linearly from
        shrinkwrap_threshold_start to shrinkwrap_threshold. The high early threshold removes a
        uniform offset filling a loose support (the unmeasured low-q voxels leave it nearly
        free); the low final threshold with a narrow blur keeps the corners and edges of a
        faceted particle, which a wide blur lowers to an eighth (corners) or a quarter (edges)
        of the plateau.
        """
        prm = self.params
        u = update / (n_updates - 1) if n_updates > 1 else 1.0
        u = min(max(u, 0.0), 1.0)
        sigma = prm.sigma_start * (prm.sigma_end / prm.sigma_start) ** u
        fraction = prm.shrinkwrap_threshold_start + u * (
            prm.shrinkwrap_threshold - prm.shrinkwrap_threshold_start
        )
        return sigma, fraction

    # -- iteration ---------------------------------------------------------------------------
    def step(self, name: str, rho, support):
        """One iteration of algorithm ``name``; returns (new iterate, P_M rho)."""
        beta = self.params.beta
        p = self.project_fourier(rho)
        if name == "ER":
            new = self.project_support(p, support)
        elif name == "HIO":
            keep = support & (p > 0) if self.params.positivity else support
            new = self.xp.where(keep, p, rho - beta * p)
        elif name == "DM":
            new = rho + self.project_support(2 * p - rho, support) - p
        elif name == "RAAR":
            new = beta * (rho + self.project_support(2 * p - rho, support) - p) + (1 - beta) * p
        else:  # parse_recipe guards this
            raise ConfigError(f"unknown phasing algorithm {name!r}")
        return new.astype(rho.dtype), p

    def support_error(self, p, support):
        """||P_M rho - P_S P_M rho|| / ||P_M rho|| per start: 0 when both constraints hold."""
        xp = self.xp
        axes = tuple(range(1, p.ndim))
        outside = p - self.project_support(p, support)
        num = xp.sqrt(xp.sum(outside * outside, axis=axes))
        den = xp.sqrt(xp.sum(p * p, axis=axes))
        return num / xp.maximum(den, 1e-30)

    def run(self, start=None, support=None):
        """Phase ``params.starts`` random starts, or the given ``start`` densities
        ``(starts, *shape)``; returns (densities, supports, error history).

        ``support`` (bool, ``shape``) replaces the autocorrelation's support as the initial
        support and the bound of every shrink-wrap. densities ``(starts, *shape)`` real,
        non-negative; supports bool of the same shape; errors ``(iterations, starts)`` the
        support error of P_M rho at every iteration.
        """
        xp, prm = self.xp, self.params
        support0 = self.initial_support() if support is None else xp.asarray(support, dtype=bool)
        n_starts = prm.starts if start is None else int(start.shape[0])
        supports = xp.broadcast_to(support0, (n_starts,) + self.shape).copy()
        if start is None:
            rho = self.random_start(np.random.default_rng(prm.seed), supports)
        else:
            rho = self.project_support(xp.asarray(start, dtype=xp.float32), supports)
        history = []
        n_stages = len(self.stages)
        wrapped = [s < n_stages - 1 or n_stages == 1 for s in range(n_stages)]
        n_updates = sum(c for (c, _), w in zip(self.stages, wrapped, strict=True) if w)
        n_updates = n_updates // prm.shrinkwrap_every if prm.shrinkwrap_every > 0 else 0
        update = 0
        it = 0
        for s, (count, name) in enumerate(self.stages):
            wrap = prm.shrinkwrap_every > 0 and wrapped[s]
            for _ in range(count):
                rho, p = self.step(name, rho, supports)
                it += 1
                history.append(self.support_error(p, supports))
                if wrap and it % prm.shrinkwrap_every == 0:
                    # the solution estimate, not P_M rho: outside the support P_M rho carries
                    # whatever DM / RAAR / HIO have not yet shed, and a support grown to cover
                    # it absorbs an offset that the free low-q voxels leave unconstrained;
                    # the autocorrelation's support bounds every later one
                    sigma, fraction = self.shrinkwrap_schedule(update, n_updates)
                    update += 1
                    estimate = self.project_support(p, supports)
                    supports = support0 & self.threshold_support(estimate, sigma, fraction)
        final = self.band_limit(self.project_support(self.project_fourier(rho), supports))
        errors = xp.stack(history) if history else xp.zeros((0, n_starts))
        return final, supports, errors


#: a pattern whose final support error is more than this many times the lower quartile of the
#: curve's patterns stagnated (on Dragonfly-simulated data: 0.39-0.43 against 0.06-0.12, with
#: a tenth of the particle volume). The quartile, not the median: on the validation matrix up to
#: 6 of 11 patterns of a curve collapsed, which lifted the median above the good ones' errors
STAGNATION_FACTOR = 2.0
STAGNATION_RETRIES = 2


def final_error(res) -> float:
    """The support error of a phasing result: the last iteration's, over the starts averaged."""
    return float(np.asarray(res.errors)[-1][res.kept].mean())


def stagnated(results) -> list[int]:
    """Patterns whose final error is an outlier of the curve's (needs 3 patterns or more)."""
    if len(results) < 3:
        return []
    errors = np.array([final_error(r) for r in results])
    return [int(k) for k in np.flatnonzero(errors > STAGNATION_FACTOR
                                          * np.quantile(errors, 0.25))]


def retry_replaces(old_error: float, old_volume: float, new_error: float, new_volume: float,
                   typical: float) -> bool:
    """Whether a re-phasing of a stagnated pattern (:func:`retry_params`) replaces its first
    result: a lower support error, a volume within a factor 2 of the curve's ``typical`` (the
    median of its sound patterns; a lower shrink-wrap threshold can also let a support grow to
    the box), and a volume closer to ``typical`` than the first result's.

    The last condition is there because the two support errors are not comparable: the retry's
    lower threshold grows the support, and a larger support always leaves less of P_M rho
    outside it. The retry is meant to rescue a collapsed support (a tenth of the particle's
    volume); where the first result's volume was already the curve's and only its error was
    high (the blurred fringes of a size spread at the sphere end of a curve), the grown
    support took a lower error and a volume 20-50 % larger, one point spiking on the curve
    (validation matrix: `df64`, `df96low`). Without a typical volume (no q scale, or no sound
    pattern) the error alone decides.
    """
    if not new_error < old_error:
        return False
    if not np.isfinite(typical) or typical <= 0:
        return True
    if not (np.isfinite(new_volume) and 0.5 * typical <= new_volume <= 2.0 * typical):
        return False
    if not np.isfinite(old_volume) or old_volume <= 0:
        return True
    return abs(np.log(new_volume / typical)) < abs(np.log(old_volume / typical))


def independent_params(params: PhasingParams) -> PhasingParams:
    """Settings of the independent check of a pattern whose support error stays an outlier
    after its retries (:func:`spiscape.phasing.reproduced`): the run's own settings, other
    seeds (none a retry uses). Random starts at the usual shrink-wrap land where the first
    phasing did when the high error is the intensities' own (matrix VAE volumes: aligned CC
    0.88-0.98 with the neural route's density, the same error within 0.02); the retries'
    lower threshold leaves a looser support and a different density (CC 0.63-0.84)."""
    from dataclasses import replace

    return replace(params, seed=params.seed + 104729)


def retry_params(params: PhasingParams, attempt: int) -> PhasingParams:
    """Settings of the ``attempt``-th re-phasing of a stagnated pattern: other seeds and a
    shrink-wrap threshold halved each time. A collapsed support (a tenth of the particle, a
    support error of ~0.4) comes from the threshold cutting the blurred density at a fraction
    of a sharp peak; other seeds alone collapse alike (df64: 4 of 4 starts agreed on it), a
    lower threshold keeps the particle (support error 0.09, the true volume within 3 %)."""
    from dataclasses import replace

    factor = 0.5 ** attempt
    return replace(params, seed=params.seed + 7919 * attempt,
                   shrinkwrap_threshold=params.shrinkwrap_threshold * factor,
                   shrinkwrap_threshold_start=params.shrinkwrap_threshold_start * factor)
