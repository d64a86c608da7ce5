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
best view, and ``fit_z`` how far that lies from what photons drawn from the view itself give (in
standard errors): a frame of a species the reference does not hold lies far below.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spiscape.backend import to_numpy
from spiscape.emc import geometry, kernels
from spiscape.errors import InputError


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
                   detector_path=first.attrs.get("detector"))


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
        # a photon of view j lands on pixel t with probability p_tj = W_tj / Σ_t W_tj: the mean
        # and variance of log p over such photons say what a frame of that view should score
        log_p = np.log(views) - np.log(self.view_sums)[None, :]
        p = views / self.view_sums[None, :]
        self.expected_log_p = (p * log_p).sum(axis=0)
        self.variance_log_p = np.maximum((p * log_p**2).sum(axis=0) - self.expected_log_p**2,
                                         1e-12)
        self.num_avg = num_avg
        self.device_log_views = self.log_views if xp is np else xp.asarray(self.log_views)

    def place(self, counts: np.ndarray) -> dict:
        """Place a block of frames given as dense counts (b, num_pix) over the detector."""
        k = np.asarray(counts, dtype=np.float32)[:, self.used]
        photons = k.sum(axis=1).astype(np.float64)
        if np.any(photons <= 0):
            raise InputError(None, f"{int(np.sum(photons <= 0))} frame(s) have no photon on a "
                                   "used pixel: they cannot be placed")
        # the one big product, photons x log-views (b x P x R·A), where the arrays live
        if self.xp is np:
            data_term = (k @ self.log_views).astype(np.float64)  # (b, R·A)
        else:
            data_term = to_numpy(self.xp.asarray(k) @ self.device_log_views).astype(np.float64)
        # the scale profiled per view picks the best view; then, as the EMC, one scale per
        # frame (photons over the probability-weighted expected photons) for all views
        profiled = data_term - photons[:, None] * np.log(self.view_sums)[None, :]
        best = profiled.argmax(axis=1)
        top = profiled.max(axis=1)
        p = self.reference.beta_params
        beta = kernels.beta_schedule(photons, int(p["iterations"]) - 1, p["beta_start"],
                                     float(p["beta_jump"]), int(p["beta_period"]))
        scale = photons / self.view_sums[best]
        for _ in range(2):
            loglik = data_term - scale[:, None] * self.view_sums[None, :]
            prob, _, _ = kernels.responsibilities(loglik.astype(np.float32), beta, np)
            scale = photons / (prob.astype(np.float64) @ self.view_sums)
        loglik = data_term - scale[:, None] * self.view_sums[None, :]
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
            prob, _, _ = kernels.responsibilities(part.astype(np.float32), beta, np)
            per_average = prob.reshape(len(k), -1, cols.size).sum(axis=1)  # (b, A_group)
            coords += per_average @ ref.coords[cols]
            votes += np.stack([per_average[:, ref.labels[cols] == c].sum(axis=1)
                               for c in clusters], axis=1)
        coords /= groups.size
        votes /= groups.size
        label = clusters[votes.argmax(axis=1)]
        prob, _, _ = kernels.responsibilities(loglik.astype(np.float32), beta, np)
        rotation, average = np.divmod(best, self.num_avg)
        # goodness of fit: how far the frame's mean log p under its best view lies from what
        # photons drawn from that view give, in standard errors (about -1..1 for a frame of the
        # view; far below for a frame of something the reference does not hold)
        fit = ((top / photons - self.expected_log_p[best])
               / np.sqrt(self.variance_log_p[best] / photons))
        return {"coords": coords, "label": label.astype(np.int64),
                "label_weight": votes.max(axis=1), "average": average.astype(np.int32),
                "rotation": rotation.astype(np.int32),
                "probability": prob[np.arange(len(k)), best].astype(np.float64),
                "scale": scale, "loglik_per_photon": (top + 0.0) / photons, "fit_z": fit}
