"""Figures of the amortised model: z against the landscape's coordinates, the pose distribution,
volumes along z and the training curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spiscape.orient import rotations
from spiscape.plotting import plt, save


def z_vs_landscape(path, z: np.ndarray, landscape: dict | None) -> None:
    """Each frame's z (first dimension) against the landscape's CLPCA components and per-frame
    VAE latent (hexbin, frames per bin on one colour map); the histogram of z alone without a
    landscape."""
    z0 = z[:, 0]
    panels = []
    if landscape is not None:
        coords = np.asarray(landscape["clpca"], dtype=np.float64)
        for j in range(min(2, coords.shape[1])):
            panels.append((coords[:, j], f"CLPCA {j + 1}"))
        lat = landscape.get("latent")
        if lat is not None and np.isfinite(lat).any():
            panels.append((np.asarray(lat[:, 0], dtype=np.float64), "VAE latent (2D route)"))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 3.6),
                             squeeze=False)
    if not panels:
        axes[0, 0].hist(z0, bins=60, color="0.3")
        axes[0, 0].set_xlabel("z (amortised)")
        axes[0, 0].set_ylabel("frames")
    for ax, (x, name) in zip(axes[0], panels, strict=False):
        ok = np.isfinite(x) & np.isfinite(z0)
        hb = ax.hexbin(x[ok], z0[ok], gridsize=40, bins="log", cmap="viridis", mincnt=1)
        ax.set_xlabel(name)
        ax.set_ylabel("z (amortised)")
        fig.colorbar(hb, ax=ax, label="frames")
    fig.suptitle("per-frame conformation against the landscape")
    fig.tight_layout()
    save(fig, path)


def pose_distribution(path, quats: np.ndarray, point_group: str) -> None:
    """Where each frame's beam axis points in the particle's frame (R e_z: the detector shows
    I(R q)), reduced to the point group's fundamental zone, as an equal-area map; and the
    rotation angle's histogram against a uniform distribution's."""
    group = rotations.point_group(point_group)
    fz = rotations.reduce(quats, group)
    beam = np.einsum("nij,j->ni", rotations.to_matrix(fz), np.array([0.0, 0.0, 1.0]))
    theta = np.degrees(np.arccos(np.clip(beam[:, 2], -1, 1)))
    phi = np.degrees(np.arctan2(beam[:, 1], beam[:, 0]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    hb = axes[0].hexbin(phi, np.cos(np.radians(theta)), gridsize=36, cmap="viridis", mincnt=1)
    axes[0].set_xlabel("azimuth of the beam axis (deg)")
    axes[0].set_ylabel("cos(polar angle)")
    fig.colorbar(hb, ax=axes[0], label="frames")
    angle = rotations.angle_deg(fz)
    axes[1].hist(angle, bins=45, density=True, color="0.3", label="frames")
    uni = rotations.reduce(rotations.super_fibonacci(20000), group)
    axes[1].hist(rotations.angle_deg(uni), bins=45, density=True, histtype="step",
                 color="tab:orange", label="uniform")
    axes[1].set_xlabel(f"rotation angle in the {point_group} fundamental zone (deg)")
    axes[1].set_ylabel("density")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


def training_curve(path, history: list[dict]) -> None:
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    axes[0].plot(epochs, [h["nll"] for h in history], marker="o")
    axes[0].set_ylabel("negative log-likelihood per frame (nats)")
    axes[1].plot(epochs, [h["kl"] for h in history], marker="o", color="tab:orange")
    axes[1].set_ylabel("KL per frame (nats)")
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    save(fig, path)


def all_figures(out, *, frames, volumes, z, has_data, history, landscape, point_group) -> None:
    from spiscape.vae.figures import volume_sections

    out = Path(out)
    z_vs_landscape(out / "z_vs_landscape.png", frames["z"], landscape)
    pose_distribution(out / "poses.png", frames["quaternion"], point_group)
    volume_sections(out / "volumes.png", volumes, z, has_data)
    training_curve(out / "training.png", history)
