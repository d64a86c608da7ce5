"""Figures of the landscape: embedding scatter by cluster and by truth, cluster montages, regressor.

Every figure is written through :func:`spiscape.plotting.save` (headless, atomic).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
from matplotlib.colors import LogNorm

from spiscape.plotting import cluster_colour, plt, population_colour, save


def _pairs(k: int) -> list[tuple[int, int]]:
    return list(combinations(range(k), 2)) if k > 1 else [(0, 0)]


def _axis_label(prefix: str, j: int, ratio=None) -> str:
    text = f"{prefix}{j + 1}"
    if ratio is not None and j < len(ratio) and np.isfinite(ratio[j]):
        text += f" ({100 * ratio[j]:.0f} %)"
    return text


def embedding_scatter(coords, labels, path, prefix: str = "PC", ratio=None, title: str = "",
                      point_size: float = 24.0, extra=None) -> None:
    """Pairwise scatter of the components, coloured by cluster (grey: outliers).

    ``extra``: optional ``(coords, label)`` of more points drawn as black-edged stars (e.g. new
    averages placed with the regressor).
    """
    coords = np.asarray(coords)
    pairs = _pairs(coords.shape[1])
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.0 * len(pairs), 3.8), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs, strict=True):
        for c in sorted(set(np.asarray(labels).tolist())):
            sel = np.asarray(labels) == c
            ax.scatter(coords[sel, i], coords[sel, j], s=point_size, color=cluster_colour(c),
                       label="outliers" if c < 0 else f"cluster {c}", edgecolors="none",
                       alpha=0.8)
        if extra is not None:
            ex, ex_label = extra
            ax.scatter(ex[:, i], ex[:, j], s=point_size * 2.5, marker="*", edgecolors="black",
                       linewidths=0.6, color=[cluster_colour(c) for c in ex_label],
                       label="placed by regressor")
        ax.set_xlabel(_axis_label(prefix, i, ratio))
        ax.set_ylabel(_axis_label(prefix, j, ratio))
    axes[0, 0].legend(fontsize=7, markerscale=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save(fig, path)


def truth_scatter(coords, majority, mean_t, names, path, prefix: str = "PC", ratio=None,
                  point_size: float = 24.0, title: str = "") -> None:
    """Two rows of pairwise scatters: coloured by the true population, and by the mean t."""
    coords = np.asarray(coords)
    pairs = _pairs(coords.shape[1])
    fig, axes = plt.subplots(2, len(pairs), figsize=(4.0 * len(pairs), 7.4), squeeze=False)
    for col, (i, j) in enumerate(pairs):
        ax = axes[0, col]
        for lab in sorted(set(np.asarray(majority).tolist())):
            sel = np.asarray(majority) == lab
            name = names[lab] if 0 <= lab < len(names) else "none"
            ax.scatter(coords[sel, i], coords[sel, j], s=point_size, edgecolors="none",
                       color=population_colour(name), label=name, alpha=0.8)
        ax = axes[1, col]
        defined = np.isfinite(mean_t)
        ax.scatter(coords[~defined, i], coords[~defined, j], s=point_size, color="lightgrey",
                   edgecolors="none", label="contaminant (no t)")
        points = ax.scatter(coords[defined, i], coords[defined, j], s=point_size,
                            c=np.asarray(mean_t)[defined], cmap="viridis", vmin=0, vmax=1,
                            edgecolors="none")
        for row in range(2):
            axes[row, col].set_xlabel(_axis_label(prefix, i, ratio))
            axes[row, col].set_ylabel(_axis_label(prefix, j, ratio))
    axes[0, 0].legend(fontsize=7, title="true population", title_fontsize=7)
    fig.colorbar(points, ax=axes[1, -1], label="melting parameter t (0 cube, 1 sphere)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save(fig, path)


def cluster_montage(intens, coords, labels, path, per_cluster: int = 6, titles=None) -> None:
    """The averages nearest each cluster's centroid, one row per cluster, common log scale."""
    labels = np.asarray(labels)
    clusters = [c for c in sorted(set(labels.tolist())) if c >= 0] or [-1]
    rows = []
    for c in clusters:
        members = np.flatnonzero(labels == c)
        centre = coords[members].mean(axis=0)
        order = members[np.argsort(((coords[members] - centre) ** 2).sum(axis=1))]
        rows.append(order[:per_cluster])
    cols = max(1, max(r.size for r in rows))
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.5 * cols, 1.6 * len(rows)),
                             squeeze=False)
    positive = intens[intens > 0]
    vmax = float(np.percentile(positive, 99.9)) if positive.size else 1.0
    norm = LogNorm(vmin=vmax * 1e-4, vmax=vmax)
    for r, (c, members) in enumerate(zip(clusters, rows, strict=True)):
        for k, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if k >= members.size:
                continue
            a = members[k]
            ax.imshow(np.where(intens[a] > 0, intens[a], np.nan).T, origin="lower", norm=norm,
                      cmap="magma")
            ax.set_title(titles[a] if titles is not None else f"#{a}", fontsize=6)
        axes[r, 0].set_ylabel(f"cluster {c}\n({np.sum(labels == c)} av.)", fontsize=7)
    fig.tight_layout(pad=0.3)
    save(fig, path)


def explained_variance_figure(ratio, path, method: str = "pca") -> None:
    """Explained variance ratio of the leading components."""
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(np.arange(1, len(ratio) + 1), 100 * np.asarray(ratio), color="tab:blue")
    ax.set_xlabel("component")
    ax.set_ylabel("variance explained (%)" if method == "pca" else "share of coordinate variance")
    ax.set_title(f"{method.upper()} of the common-line matrix", fontsize=10)
    fig.tight_layout()
    save(fig, path)


def regressor_figure(coords, prediction, validation_index, path, metrics=None) -> None:
    """Predicted against embedded coordinates per component (validation averages highlighted)."""
    coords = np.asarray(coords)
    k = coords.shape[1]
    fig, axes = plt.subplots(1, k, figsize=(3.4 * k, 3.3), squeeze=False)
    val = np.zeros(coords.shape[0], dtype=bool)
    val[np.asarray(validation_index, dtype=int)] = True
    for j, ax in enumerate(axes[0]):
        ax.scatter(coords[~val, j], prediction[~val, j], s=12, color="tab:grey", label="training")
        ax.scatter(coords[val, j], prediction[val, j], s=20, color="tab:orange",
                   label="validation")
        lo = min(coords[:, j].min(), prediction[:, j].min())
        hi = max(coords[:, j].max(), prediction[:, j].max())
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
        ax.set_xlabel(f"component {j + 1} (embedding)")
        ax.set_ylabel("regressor")
        if metrics and j < len(metrics.get("validation_r2", [])):
            ax.set_title(f"validation MSE {metrics['validation_mse'][j]:.3g}, "
                         f"R$^2$ {metrics['validation_r2'][j]:.2f}", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)


def frame_scatter(coords, colour, path, prefix: str = "PC", kind: str = "cluster", names=None,
                  max_points: int = 20000, seed: int = 0, title: str = "",
                  colour_label: str = "") -> None:
    """Per-frame landscape: pairwise scatter of frames coloured by cluster, label or value.

    ``kind``: "cluster" (integers, -1 grey), "label" (integers named by ``names``) or "value"
    (a continuous colour, NaN grey). At most ``max_points`` frames are drawn (a seeded sample).
    """
    coords = np.asarray(coords)
    placed = np.flatnonzero(np.all(np.isfinite(coords), axis=1))
    if placed.size > max_points:
        placed = np.sort(np.random.default_rng(seed).choice(placed, max_points, replace=False))
    pairs = _pairs(coords.shape[1])
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.0 * len(pairs), 3.8), squeeze=False)
    size = 4 if placed.size > 2000 else 8
    colour = np.asarray(colour)
    for ax, (i, j) in zip(axes[0], pairs, strict=True):
        x, y, c = coords[placed, i], coords[placed, j], colour[placed]
        if kind == "value":
            defined = np.isfinite(c)
            ax.scatter(x[~defined], y[~defined], s=size, color="lightgrey", edgecolors="none")
            points = ax.scatter(x[defined], y[defined], s=size, c=c[defined], cmap="viridis",
                                edgecolors="none")
        else:
            for v in sorted(set(c.tolist())):
                sel = c == v
                if kind == "label":
                    name = names[v] if names is not None and 0 <= v < len(names) else str(v)
                    col = population_colour(name)
                else:
                    name = "unassigned" if v < 0 else f"cluster {v}"
                    col = cluster_colour(v)
                ax.scatter(x[sel], y[sel], s=size, color=col, edgecolors="none", alpha=0.6,
                           label=name)
        ax.set_xlabel(f"{prefix}{i + 1}")
        ax.set_ylabel(f"{prefix}{j + 1}")
    if kind == "value":
        fig.colorbar(points, ax=axes[0, -1], label=colour_label)
    else:
        axes[0, 0].legend(fontsize=7, markerscale=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save(fig, path)


def placed_figure(reference_coords, coords, labels, path, shares_history=None,
                  max_points: int = 20000, seed: int = 0, outlier=None) -> None:
    """Frames placed on a reference landscape: the reference's frames in grey, the placed ones
    coloured by cluster and the outliers (``outlier``, bool) as black crosses (left, PC1-PC2);
    with ``shares_history`` (list of (frames, {cluster:
    share})) the clusters' shares as frames arrived (right)."""
    rng = np.random.default_rng(seed)

    def sample(points):
        points = np.asarray(points)
        keep = np.flatnonzero(np.all(np.isfinite(points), axis=1))
        return points[rng.choice(keep, max_points, replace=False) if keep.size > max_points
                      else keep], keep

    panels = 2 if shares_history else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 3.8), squeeze=False)
    ax = axes[0, 0]
    ref, _ = sample(reference_coords)
    second = min(1, ref.shape[1] - 1)
    ax.scatter(ref[:, 0], ref[:, second], s=3, color="lightgrey", edgecolors="none",
               label="reference frames")
    coords, labels = np.asarray(coords), np.asarray(labels)
    for c in sorted(set(labels.tolist())):
        sel = labels == c
        ax.scatter(coords[sel, 0], coords[sel, second], s=4, edgecolors="none",
                   color=cluster_colour(c), label="not placed" if c < 0 else f"cluster {c}")
    if outlier is not None and np.any(outlier):
        flagged = np.asarray(outlier, dtype=bool)
        ax.scatter(coords[flagged, 0], coords[flagged, second], s=10, marker="x",
                   linewidths=0.6, color="black",
                   label=f"outlier ({100 * flagged.mean():.1f} %)")
    ax.set_xlabel("PC1")
    ax.set_ylabel(f"PC{second + 1}")
    ax.set_title(f"{len(labels)} frames placed", fontsize=9)
    ax.legend(fontsize=7, markerscale=3)
    if shares_history:
        ax = axes[0, 1]
        frames = [n for n, _ in shares_history]
        clusters = sorted({c for _, shares in shares_history for c in shares})
        for c in clusters:
            ax.plot(frames, [shares.get(c, 0.0) for _, shares in shares_history], "o-", ms=3,
                    color=cluster_colour(c), label=f"cluster {c}")
        ax.set_xlabel("frames placed")
        ax.set_ylabel("share of the frames")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)
