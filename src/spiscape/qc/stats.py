"""Streaming statistics of a photon dataset (a chunk at a time, so any size fits in memory)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from spiscape.io import Detector, SparsePhotons


@dataclass
class DatasetStats:
    num_pix: int
    photons_per_frame: list[np.ndarray] = field(default_factory=list)
    powder: np.ndarray | None = None

    def add(self, photons: SparsePhotons) -> None:
        self.photons_per_frame.append(photons.photons_per_frame())
        chunk_powder = photons.powder()
        self.powder = chunk_powder if self.powder is None else self.powder + chunk_powder

    @property
    def counts(self) -> np.ndarray:
        if not self.photons_per_frame:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(self.photons_per_frame)

    def summary(self, detector: Detector) -> dict:
        counts = self.counts
        powder = self.powder if self.powder is not None else np.zeros(self.num_pix)
        total = float(powder.sum())
        bad = detector.mask == 2
        return {
            "num_frames": int(counts.size),
            "num_pix": int(self.num_pix),
            "pixels_used": int(np.count_nonzero(detector.mask == 0)),
            "pixels_merged_only": int(np.count_nonzero(detector.mask == 1)),
            "pixels_bad": int(np.count_nonzero(bad)),
            "photons_total": total,
            "photons_per_frame_mean": float(counts.mean()) if counts.size else 0.0,
            "photons_per_frame_median": float(np.median(counts)) if counts.size else 0.0,
            "photons_per_frame_min": int(counts.min()) if counts.size else 0,
            "photons_per_frame_max": int(counts.max()) if counts.size else 0,
            "empty_frames": int(np.count_nonzero(counts == 0)),
            "fraction_photons_on_bad_pixels": float(powder[bad].sum() / total) if total else 0.0,
        }


def accumulate(chunks: Iterable[tuple[int, SparsePhotons]], num_pix: int, progress=None):
    """Fold the (start, photons) chunks of a dataset into a :class:`DatasetStats`."""
    stats = DatasetStats(num_pix=num_pix)
    for _, photons in chunks:
        stats.add(photons)
        if progress is not None:
            progress.update(photons.num_frames)
    return stats


def radial_profile(values: np.ndarray, detector: Detector, num_bins: int = 64):
    """Mean of per-pixel ``values`` in shells of |q| (voxel units) over pixels not marked bad.

    Returns bin centres and means; shells without a usable pixel are NaN.
    """
    qmag = np.sqrt(detector.qx**2 + detector.qy**2 + detector.qz**2)
    good = detector.mask < 2
    edges = np.linspace(0.0, qmag[good].max() * (1 + 1e-9), num_bins + 1)
    which = np.digitize(qmag[good], edges) - 1
    sums = np.bincount(which, weights=values[good], minlength=num_bins)[:num_bins]
    hits = np.bincount(which, minlength=num_bins)[:num_bins]
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(hits > 0, sums / np.maximum(hits, 1), np.nan)
    return 0.5 * (edges[1:] + edges[:-1]), means
