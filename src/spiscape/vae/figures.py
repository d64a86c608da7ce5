"""Figures of the VAE stage: central sections of the volumes along <100>, <110>, <111> on a log
scale for several latent points, latent histograms, loss curves, convergence curves and each
frame's size against its latent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import map_coordinates

from spiscape.plotting import plt, save

DIRECTIONS = {"<100>": np.array([1.0, 0.0, 0.0]), "<110>": np.array([1.0, 1.0, 0.0]),
              "<111>": np.array([1.0, 1.0, 1.0])}


def central_section(volume: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The plane through q = 0 perpendicular to ``normal`` (V x V, trilinear)."""
    n = normal / np.linalg.norm(normal)
    u = np.cross(n, [0.0, 0.0, 1.0] if abs(n[2]) < 0.9 else [1.0, 0.0, 0.0])
    u /= np.linalg.norm(u)
    v = np.cross(n, u)
    V = volume.shape[0]
    ax = np.arange(V) - V // 2
    a, b = np.meshgrid(ax, ax, indexing="ij")
    pts = a[None] * u[:, None, None] + b[None] * v[:, None, None] + V // 2
    return map_coordinates(volume, pts, order=1, mode="constant", cval=np.nan)


def volume_sections(path, intens: np.ndarray, z: np.ndarray, has_data=None, max_rows: int = 6):
    rows = np.unique(np.linspace(0, len(intens) - 1, min(max_rows, len(intens))).astype(int))
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.4 * len(rows)), squeeze=False)
    for r, k in enumerate(rows):
        for c, (name, normal) in enumerate(DIRECTIONS.items()):
            sec = central_section(intens[k], normal)
            ax = axes[r, c]
            ax.imshow(np.log10(np.clip(sec, np.nanmax(sec) * 1e-6, None)).T, origin="lower",
                      cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"normal {name}")
            if c == 0:
                zs = ", ".join(f"{v:.2f}" for v in z[k])
                flag = "" if has_data is None or has_data[k] else " (no data)"
                ax.set_ylabel(f"z = {zs}{flag}", fontsize=8)
    fig.suptitle("decoded intensity, log10, central sections")
    save(fig, path)


def latent_histograms(path, mu: np.ndarray, selected=None, colour=None, colour_label="t"):
    zdim = mu.shape[1]
    fig, axes = plt.subplots(1, zdim + (1 if zdim >= 2 else 0), figsize=(4 * (zdim + 1), 3),
                             squeeze=False)
    sel = np.ones(len(mu), bool) if selected is None else np.asarray(selected)
    for k in range(zdim):
        ax = axes[0, k]
        ax.hist(mu[sel, k], bins=30, color="C0", label="trained on")
        if (~sel).any():
            ax.hist(mu[~sel, k], bins=30, color="C3", alpha=0.6, label="excluded")
            ax.legend(fontsize=7)
        ax.set_xlabel(f"mu[{k}]")
        ax.set_ylabel("averages")
        ax.yaxis.get_major_locator().set_params(integer=True)  # counts
    if zdim >= 2:
        ax = axes[0, zdim]
        sc = ax.scatter(mu[:, 0], mu[:, 1], c=colour if colour is not None else sel, s=8,
                        cmap="viridis")
        if colour is not None:
            fig.colorbar(sc, ax=ax, label=colour_label)
        ax.set_xlabel("mu[0]")
        ax.set_ylabel("mu[1]")
    save(fig, path)


def loss_curves(path, history: dict):
    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    for ax, key in zip(axes, ("loss", "recon", "kl"), strict=True):
        ax.plot(history["epoch"], history[key], "o-", ms=2)
        ax.set_xlabel("epoch")
        ax.set_ylabel({"loss": "loss per average", "recon": "Poisson deviance per pixel",
                       "kl": "KL divergence (nats)"}[key])
        ax.set_title({"loss": "total", "recon": "reconstruction",
                      "kl": "KL"}[key], fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
    save(fig, path)


def convergence_curves(path, convergence: dict):
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    ep = np.asarray(convergence["epoch"])
    axes[0].plot(ep, convergence["volume_cc"], "o-")
    axes[0].set_title("volumes at fixed z: CC with previous check", fontsize=9)
    axes[0].set_ylabel("CC (log intensity)")
    lp = np.asarray(convergence["latent_pearson"], dtype=float)
    for k in range(lp.shape[1] if lp.ndim == 2 else 0):
        axes[1].plot(ep, lp[:, k], "o-", label=f"mu[{k}]")
    axes[1].set_title("latents: Pearson r with previous check", fontsize=9)
    axes[1].set_ylabel("Pearson r")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("epoch")
    save(fig, path)


def latent_vs_truth(path, mu0, truth_t, rho):
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.scatter(truth_t, mu0, s=8)
    ax.set_xlabel("true t of the average")
    ax.set_ylabel("mu[0]")
    ax.set_title(f"Spearman rho = {rho:.3f}", fontsize=9)
    save(fig, path)


def shell_cc(path, q, cc, qmax, fraction):
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(q, cc, "o-", ms=3)
    ax.axvline(fraction * qmax, color="k", ls=":")
    ax.axhline(0.9, color="C3", ls=":")
    ax.set_xlabel("|q| (voxels)")
    ax.set_ylabel("shell correlation")
    save(fig, path)


def frame_sizes(path, latent: np.ndarray, size: np.ndarray, steps=None):
    """Each frame's size factor against its latent (a 2D histogram of frame counts) and the
    size factors' histogram: a population's size spread, and whether it changes along the
    latent. ``steps``: the posterior's size factors; the size bins are centred on them (a
    frame's posterior is often narrower than a step, so its mean sits near one, and bins not
    aligned with the steps would show them as peaks)."""
    from matplotlib.colors import LogNorm

    use = np.isfinite(size) & np.isfinite(latent[:, 0])
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.4), gridspec_kw={"wspace": 0.45})
    bins = 30
    if steps is not None and len(steps) >= 2:
        steps = np.sort(np.asarray(steps, dtype=np.float64))
        mid = (steps[1:] + steps[:-1]) / 2
        bins = np.concatenate([[2 * steps[0] - mid[0]], mid, [2 * steps[-1] - mid[-1]]])
    if use.any():
        _, _, _, img = axes[0].hist2d(latent[use, 0], size[use], bins=(40, bins),
                                      cmap="viridis", norm=LogNorm(), cmin=1)
        fig.colorbar(img, ax=axes[0], label="frames per bin")
        axes[1].hist(size[use], bins=bins, color="C0")
    axes[0].set_xlabel("frame latent z[0] (posterior mean)")
    axes[0].set_ylabel("size factor (posterior mean)")
    axes[1].set_xlabel("size factor, relative to the decoded volume at the frame's latent")
    axes[1].set_ylabel("frames")
    fig.suptitle(f"each frame's size from its photons ({int(use.sum())} frames)", fontsize=9)
    save(fig, path)


def all_figures(folder, **kw):
    folder = Path(folder)
    if kw.get("frame_size") is not None:
        frame_sizes(folder / "frame_sizes.png", kw["frame_latent"], kw["frame_size"],
                    kw.get("frame_size_steps"))
    volume_sections(folder / "volumes.png", kw["intens"], kw["z"], kw.get("has_data"))
    latent_histograms(folder / "latent_hist.png", kw["mu"], kw.get("selected"), kw.get("colour"))
    loss_curves(folder / "loss.png", kw["history"])
    if kw["convergence"]["epoch"]:
        convergence_curves(folder / "convergence.png", kw["convergence"])
