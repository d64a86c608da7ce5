"""Figures of the 3D EMC: the models' central sections, occupancy and convergence."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import LogNorm

from spiscape.plotting import plt, save


def sections_figure(intens: np.ndarray, occupancy: np.ndarray, path) -> None:
    """One row per model: its three central sections (log scale, one colour map for all) and
    its share of the frames."""
    count, size = intens.shape[0], intens.shape[1]
    centre = size // 2
    fig, axes = plt.subplots(count, 3, figsize=(7.5, 2.5 * count), squeeze=False)
    positive = intens[intens > 0]
    vmax = float(np.percentile(positive, 99.9)) if positive.size else 1.0
    norm = LogNorm(vmin=vmax * 1e-4, vmax=vmax)
    extent = (-centre, centre, -centre, centre)
    image = None
    for k in range(count):
        sections = (intens[k, centre], intens[k, :, centre], intens[k, :, :, centre])
        for ax, section, name in zip(axes[k], sections, ("qx = 0", "qy = 0", "qz = 0"),
                                     strict=True):
            image = ax.imshow(np.where(section > 0, section, np.nan).T, origin="lower",
                              norm=norm, cmap="magma", extent=extent)
            ax.set_title(f"model {k}, {name}", fontsize=8)
            ax.set_xlabel("q (voxels)", fontsize=7)
            ax.tick_params(labelsize=6)
        axes[k, 0].set_ylabel(f"{100 * occupancy[k]:.0f} % of frames\nq (voxels)", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="photons per pixel (scale 1)")
    save(fig, path)


def convergence_figure(log: dict, path) -> None:
    """rms change, mutual information, log-likelihood per frame and the models' occupancy per
    iteration."""
    it = log["iteration"]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    axes[0].semilogy(it, log["rms_change"])
    axes[1].plot(it, log["mutual_info"])
    axes[2].plot(it, log["log_likelihood"])
    for k in range(log["occupancy"].shape[1]):
        axes[3].plot(it, log["occupancy"][:, k], label=f"model {k}")
    titles = ("largest relative rms change", "mutual information (nats)",
              "log-likelihood / frame", "occupancy (share of frames)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
    axes[3].set_ylim(0, 1)
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)
