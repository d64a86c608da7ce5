"""Figures of the dataset check."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import LogNorm

from spiscape.io import Detector
from spiscape.plotting import plt, population_colour, save


def powder_figure(powder: np.ndarray, detector: Detector, num_frames: int, path) -> None:
    """Virtual powder pattern (photons per pixel per frame) on log scale, bad pixels grey."""
    per_frame = powder / max(num_frames, 1)
    image = detector.assemble(np.where(detector.mask == 2, np.nan, per_frame))
    positive = image[np.isfinite(image) & (image > 0)]
    fig, ax = plt.subplots(figsize=(5.2, 4.5))
    ax.set_facecolor("0.75")
    if positive.size:
        norm = LogNorm(vmin=max(positive.min(), positive.max() * 1e-5), vmax=positive.max())
        shown = ax.imshow(image.T, origin="lower", norm=norm, cmap="magma")
        fig.colorbar(shown, ax=ax, label="photons per pixel per frame")
    ax.set_title(f"Virtual powder pattern ({num_frames} frames)")
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    save(fig, path)


def photons_figure(counts: np.ndarray, path, groups: dict[str, np.ndarray] | None = None) -> None:
    """Histogram of photons per frame, split by population when the truth is known."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    top = max(int(np.percentile(counts, 99.5)) if counts.size else 1, 1)
    bins = np.linspace(0, top * 1.05, 60)
    if groups:
        ax.hist(list(groups.values()), bins=bins, stacked=True, label=list(groups),
                color=[population_colour(name) for name in groups])
        ax.legend(title="population", fontsize=8)
    else:
        ax.hist(counts, bins=bins, color="C0")
    ax.set_xlabel("photons per frame")
    ax.set_ylabel("frames")
    ax.yaxis.get_major_locator().set_params(integer=True)  # counts
    mean = counts.mean() if counts.size else 0.0
    ax.set_title(f"{counts.size} frames, mean {mean:.0f} photons")
    save(fig, path)


def radial_figure(q: np.ndarray, mean: np.ndarray, path) -> None:
    """Radial profile of the powder pattern on log scale: speckle rings show as oscillations."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ok = np.isfinite(mean) & (mean > 0)
    ax.semilogy(q[ok], mean[ok], "-", color="C3")
    ax.set_xlabel("|q| (voxels of the 3D grid = detector pixels at the centre)")
    ax.set_ylabel("photons per pixel per frame")
    ax.set_title("Radial profile of the powder pattern")
    save(fig, path)
