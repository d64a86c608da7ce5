"""Placing frames on a fixed landscape: an E-step against the reference's class averages, with no
re-classification (``spiscape place``).

For every frame d and every (average a, in-plane rotation r) the Poisson log-likelihood of its
photons K_dt on the used pixels, with the frame's scale profiled out (the maximum-likelihood
φ = N_d / Σ_t W_art):

    L_dar = Σ_t K_dt log W_art − N_d log Σ_t W_art      (+ a constant per frame)

with W the average a turned by r and read at the frame's pixels (the same bilinear views as the
EMC). The probabilities P_dar ∝ exp(β_d (L_dar − max)) use the β the reference's EMC ended
with (its own schedule at its last iteration), so a frame is as sure of its averages as the
frames the landscape was built from were of their classes. The frame's coordinates are the
probability-weighted mean of the averages' embedding coordinates, its cluster the
probability-weighted vote of their clusters (as ``spiscape landscape`` does per replicate), and
``loglik_per_photon`` = max L / N_d is the mean log-probability of its photons' pixels under the
best view.

**Outliers.** A frame of a species the reference does not hold still has a best view, and its
log-likelihood is no guide: a rod's photons, gathered where a cube's view is bright, can score
*higher* per photon than the cube's own frames. What gives it away is the *shape* of where its
photons fall. The best view's pixels are cut into ``MISFIT_BINS`` bins of equal expected photon
share, from its faintest pixels to its brightest; a frame drawn from the view puts N_d / B
photons in each, up to Poisson noise, and Pearson's statistic X² over the bins follows χ²(B − 1).
``misfit`` = (X² − (B − 1)) / N_d estimates the χ² divergence between where the frame's photons
fell and where the view puts them: about 0 for a frame of the view whatever its photon count,
positive for a frame the view does not explain. ``calibrate`` places a sample of the reference's
own frames and sets the outlier threshold at a quantile of their misfit (0.99: about 1 % of
frames like the reference's are flagged); frames above it are ``outlier``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from spiscape.backend import to_numpy
from spiscape.emc import geometry, kernels
from spiscape.errors import InputError

#: bins of equal expected photon share of the best view for the misfit statistic (see above)
MISFIT_BINS = 16


@dataclass
class Reference:
    """What placement needs of a dataset's results: averages, their landscape, the EMC's
    in-plane rotations and the β its annealing ended with."""

    intens: np.ndarray  # (A, S, S)
    coords: np.ndarray  # (A, k)
    labels: np.ndarray  # (A,)
    replicate: np.ndarray  # (A,) the bootstrap replicate each average came from
    num_rot: int
    friedel: bool
    beta_params: dict  # beta_start, beta_jump, beta_period, iterations
    detector_path: str | None = None  # the detector file the reference's EMC was run with
    photons: tuple = ()  # the reference's photon files (for the outlier calibration)

    @classmethod
    def from_results(cls, folder) -> Reference:
        from pathlib import Path

        from spiscape.io.averages import read_averages
        from spiscape.io.embedding import read_embedding
        from spiscape.io.replicate import read_replicate, replicate_files

        folder = Path(folder)
        averages = read_averages(folder / "averages.h5")
        emb = read_embedding(folder / "embedding.h5", count=averages.count)
        reps = replicate_files(folder)
        if not reps:
            raise InputError(folder / "classify2d", "no replicate rep*.h5: not a results folder "
                                                    "of spiscape classify2d")
        first = read_replicate(reps[0], models=False)
        params = first.params
        return cls(intens=averages.intens, coords=emb.coords, labels=np.asarray(emb.labels),
                   replicate=np.asarray(averages.replicate), num_rot=int(params["num_rot"]),
                   friedel=bool(params["friedel"]),
                   beta_params={key: params[key] for key in ("beta_start", "beta_jump",
                                                             "beta_period", "iterations")},
                   detector_path=first.attrs.get("detector"),
                   photons=tuple(json.loads(first.attrs.get("photons", "[]"))))


class Placer:
    """The reference's views on a detector's used pixels, ready for blocks of frames."""

    def __init__(self, reference: Reference, detector, detector_path=None, xp=np):
        self.reference = reference
        self.xp = xp  # the array module of the big product (CuPy on a GPU); the rest on the host
        used = np.flatnonzero(detector.mask == 0)
        if used.size == 0:
            raise InputError(detector_path, "the detector has no used pixel (mask 0)")
        self.used = used
        size = reference.intens.shape[-1]
        cx, cy = geometry.pixel_coords_2d(detector)
        angles = geometry.rotation_angles(reference.num_rot, reference.friedel)
        try:
            table = geometry.rotation_table(cx[used], cy[used], angles, size)
        except Exception:  # pixels beyond the averages' grid: another detector
            raise InputError(detector_path, f"its pixels reach beyond the reference averages' "
                                            f"{size} x {size} grid: not the detector (or "
                                            "geometry) the reference was made with") from None
        operator = kernels.view_operator(table.index, table.weight, size, np)  # (R·P, S²)
        num_avg = reference.intens.shape[0]
        views = operator @ reference.intens.reshape(num_avg, -1).T  # (R·P, A)
        views = views.reshape(len(angles), used.size, num_avg).transpose(1, 0, 2)
        views = views.reshape(used.size, -1)  # (P, R·A), column j = r·A + a
        floor = kernels.LOG_FLOOR * float(views.mean()) + float(np.finfo(np.float32).tiny)
        views = np.maximum(views, floor)
        self.log_views = np.log(views).astype(np.float32)
        self.view_sums = views.sum(axis=0)  # (R·A,)
        self.bins, self.bin_share = misfit_bins(views / self.view_sums[None, :])
        self.num_avg = num_avg
        self.outlier_threshold = float("nan")  # set by calibrate
        self.device_log_views = self.log_views if xp is np else xp.asarray(self.log_views)

    def place(self, counts: np.ndarray) -> dict:
        """Place a block of frames given as dense counts (b, num_pix) over the detector."""
        k = np.asarray(counts, dtype=np.float32)[:, self.used]
        photons = k.sum(axis=1).astype(np.float64)
        if np.any(photons <= 0):
            raise InputError(None, f"{int(np.sum(photons <= 0))} frame(s) have no photon on a "
                                   "used pixel: they cannot be placed")
        # the one big product, photons x log-views (b x P x R·A), where the arrays live; the
        # rest in float32 as the EMC (log-likelihoods ~1e4, differences of 1e-3 are immaterial)
        if self.xp is np:
            data_term = k @ self.log_views  # (b, R·A) float32
        else:
            data_term = to_numpy(self.xp.asarray(k) @ self.device_log_views)
        sums32 = self.view_sums.astype(np.float32)
        # the scale profiled per view picks the best view; then, as the EMC, one scale per
        # frame (photons over the probability-weighted expected photons) for all views
        profiled = data_term - (photons[:, None] * np.log(self.view_sums)[None, :]).astype(
            np.float32)
        best = profiled.argmax(axis=1)
        top = profiled[np.arange(len(k)), best].astype(np.float64)
        del profiled
        p = self.reference.beta_params
        beta = kernels.beta_schedule(photons, int(p["iterations"]) - 1, p["beta_start"],
                                     float(p["beta_jump"]), int(p["beta_period"]))
        scale = photons / self.view_sums[best]
        for _ in range(2):
            loglik = data_term - scale[:, None].astype(np.float32) * sums32[None, :]
            prob, _, _ = kernels.responsibilities(loglik, beta, np)
            scale = photons / (prob @ sums32).astype(np.float64)
        loglik = data_term - scale[:, None].astype(np.float32) * sums32[None, :]
        ref = self.reference
        # as the batch landscape: within each bootstrap replicate the frame's probabilities over
        # that replicate's averages give coordinates and a cluster vote; the replicates' are
        # averaged (each replicate is one classification of the data)
        by_rotation = loglik.reshape(len(k), -1, self.num_avg)
        clusters = np.unique(ref.labels)
        coords = np.zeros((len(k), ref.coords.shape[1]))
        votes = np.zeros((len(k), clusters.size))
        groups = np.unique(ref.replicate)
        for group in groups:
            cols = np.flatnonzero(ref.replicate == group)
            part = np.ascontiguousarray(by_rotation[:, :, cols].reshape(len(k), -1))
            prob, _, _ = kernels.responsibilities(part, beta, np)
            per_average = prob.reshape(len(k), -1, cols.size).sum(axis=1)  # (b, A_group)
            coords += per_average @ ref.coords[cols]
            votes += np.stack([per_average[:, ref.labels[cols] == c].sum(axis=1)
                               for c in clusters], axis=1)
        coords /= groups.size
        votes /= groups.size
        label = clusters[votes.argmax(axis=1)]
        # the probability of the best view: exp(β (L_best − max)) / Σ_j exp(β (L_j − max))
        shifted = loglik - loglik.max(axis=1, keepdims=True)
        at_best = shifted[np.arange(len(k)), best].astype(np.float64)
        shifted *= beta[:, None].astype(np.float32)
        np.exp(np.maximum(shifted, kernels.LOG_PROB_CUT, out=shifted), out=shifted)
        probability = np.exp(beta * at_best) / shifted.sum(axis=1, dtype=np.float64)
        rotation, average = np.divmod(best, self.num_avg)
        fit = misfit(k, best, self.bins, self.bin_share)
        return {"coords": coords, "label": label.astype(np.int64),
                "label_weight": votes.max(axis=1), "average": average.astype(np.int32),
                "rotation": rotation.astype(np.int32),
                "probability": probability,
                "scale": scale, "loglik_per_photon": top / photons, "misfit": fit,
                "outlier": fit > self.outlier_threshold}

    def calibrate(self, counts: np.ndarray, quantile: float = 0.99) -> float:
        """Set the outlier threshold at ``quantile`` of the misfit of ``counts`` (dense frames
        of the reference's own data, or of data known to hold only what it holds)."""
        if len(counts) == 0:
            raise InputError(None, "no frame to calibrate the outlier threshold on")
        values = self.place(counts)["misfit"]
        self.outlier_threshold = float(np.quantile(values, quantile))
        return self.outlier_threshold


def misfit_bins(p: np.ndarray, num_bins: int = MISFIT_BINS) -> tuple[np.ndarray, np.ndarray]:
    """For each view (column of the pixel probabilities ``p`` (P, C), columns summing to 1) the
    bin of every pixel, (P, C) uint8: pixels sorted by p and cut where the cumulative share
    crosses k / num_bins; and each bin's share of the view's photons, (C, num_bins)."""
    bins = np.empty(p.shape, dtype=np.uint8)
    share = np.zeros((p.shape[1], num_bins))
    step = max(1, (1 << 24) // max(p.shape[0], 1))  # columns at a time: bounded memory
    for lo in range(0, p.shape[1], step):
        block = p[:, lo:lo + step]
        order = np.argsort(block, axis=0, kind="stable")
        sorted_p = np.take_along_axis(block, order, axis=0)
        cumulative = np.cumsum(sorted_p, axis=0) - 0.5 * sorted_p  # a pixel's mid-point
        b = np.minimum((cumulative * num_bins).astype(np.int64), num_bins - 1)
        np.put_along_axis(bins[:, lo:lo + step], order, b.astype(np.uint8), axis=0)
        for k in range(num_bins):
            share[lo:lo + step, k] = np.where(b == k, sorted_p, 0).sum(axis=0)
    return bins, share


def misfit(counts: np.ndarray, best: np.ndarray, bins: np.ndarray,
           share: np.ndarray) -> np.ndarray:
    """(X² − (B − 1)) / N of each frame's photons ``counts`` (b, P) over the bins of its view
    ``best`` (b,), with B bins of expected shares ``share`` (see the module docstring)."""
    num_bins = share.shape[1]
    rows, pix = np.nonzero(counts)
    which = bins[pix, best[rows]].astype(np.int64)
    observed = np.bincount(rows * num_bins + which, weights=counts[rows, pix],
                           minlength=len(counts) * num_bins).reshape(len(counts), num_bins)
    photons = observed.sum(axis=1)
    expected = photons[:, None] * share[best]
    pearson = ((observed - expected) ** 2 / np.maximum(expected, 1e-12)).sum(axis=1)
    freedom = (share[best] > 0).sum(axis=1) - 1  # a pixel brighter than 1/B leaves bins empty
    return (pearson - freedom) / photons
