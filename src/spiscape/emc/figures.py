"""Figures of EMC classification: convergence of every replicate and the class averages."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import LogNorm

from spiscape.io.replicate import read_replicate
from spiscape.plotting import plt, save


def convergence_figure(replicate_paths, path) -> None:
    """rms change, mutual information and log-likelihood per iteration, one line per replicate."""
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for number, rep in enumerate(replicate_paths):
        table = read_replicate(rep, models=False, details=True).log
        it = table["iteration"]
        axes[0].semilogy(it, table["rms_change"], label=f"rep{number}")
        axes[1].plot(it, table["mutual_info"])
        axes[2].plot(it, table["log_likelihood"])
        axes[3].semilogy(it, table["beta"])
    for ax, title in zip(
        axes, ["relative rms change", "mutual information", "log-likelihood / frame", "mean beta"],
        strict=True,
    ):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)


def montage_figure(intens, path, titles=None, columns: int = 10) -> None:
    """Class averages on a common log scale, most populated first when titles say so."""
    count = intens.shape[0]
    rows = max(1, int(np.ceil(count / columns)))
    cols = min(columns, count)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.45 * rows), squeeze=False)
    positive = intens[intens > 0]
    vmax = float(np.percentile(positive, 99.9)) if positive.size else 1.0
    norm = LogNorm(vmin=vmax * 1e-4, vmax=vmax)
    for k, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if k < count:
            ax.imshow(np.where(intens[k] > 0, intens[k], np.nan).T, origin="lower", norm=norm,
                      cmap="magma")
            if titles is not None:
                ax.set_title(titles[k], fontsize=6)
    fig.tight_layout(pad=0.2)
    save(fig, path)
