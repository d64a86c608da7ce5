"""After training: latents of the averages, volumes along the latent, per-frame latents, and the
outputs' files (latent.h5, volumes.h5, volumes/*.mrc, frame_latent.h5).

``volumes.h5``: ``z (K, zdim)``, ``intens (K, V, V, V)`` f4 (centred at V // 2, one voxel = one
detector pixel at the centre, arbitrary overall scale ~ photons per pixel of a mean average),
``has_data (K,)`` (a data mu lies within one grid step of z), attrs ``q_per_voxel_inv_nm`` when
known, ``point_group``, ``q_min_measured`` / ``q_max_measured`` (voxels: the |q| range of the
pixels in the loss; outside it, inside the beamstop and beyond the detector, the volume is the
decoder's extrapolation and should be treated as unmeasured, e.g. by phase retrieval).
"""

from __future__ import annotations

import numpy as np
import torch


def latent_points(mu: np.ndarray, num: int) -> tuple[np.ndarray, np.ndarray]:
    """K points spanning the data's latent range: a line (zdim 1) or an n x n grid (zdim 2, n =
    round(sqrt(num)); higher zdim: a line along the first principal axis). has_data: a data mu
    lies within one grid step (the diagonal step for a grid) of the point."""
    mu = np.asarray(mu, dtype=np.float64)
    zdim = mu.shape[1]
    lo, hi = mu.min(0), mu.max(0)
    if zdim == 1:
        z = np.linspace(lo[0], hi[0], num)[:, None]
        step = (hi[0] - lo[0]) / max(num - 1, 1)
    elif zdim == 2:
        n = max(int(round(np.sqrt(num))), 2)
        g = np.meshgrid(np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n),
                        indexing="ij")
        z = np.stack([g[0].ravel(), g[1].ravel()], axis=1)
        step = float(np.hypot(*(hi - lo) / (n - 1)))
    else:
        centre = mu.mean(0)
        _, _, vt = np.linalg.svd(mu - centre, full_matrices=False)
        proj = (mu - centre) @ vt[0]
        z = centre + np.linspace(proj.min(), proj.max(), num)[:, None] * vt[0]
        step = (proj.max() - proj.min()) / max(num - 1, 1)
    dist = np.sqrt(((z[:, None, :] - mu[None]) ** 2).sum(-1)).min(1)
    has_data = dist <= max(step, 1e-12) * (1.0 + 1e-9)
    return z, has_data


@torch.no_grad()
def decode_volumes(model, z: np.ndarray, device="cpu", chunk: int = 4) -> np.ndarray:
    """Symmetrised volumes (K, V, V, V) float32 at latent points z (K, zdim)."""
    model.eval()
    out = []
    zt = torch.as_tensor(np.asarray(z), dtype=torch.float32)
    for s in range(0, zt.shape[0], chunk):
        out.append(model.volumes(zt[s:s + chunk].to(device)).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def frame_latents(replicate_files, replicate_of, class_of, mu: np.ndarray,
                  num_frames: int) -> np.ndarray:
    """Per-frame latent (N, zdim): the occupancy-weighted mean of the latents of the averages of
    the frame's classes (weights renormalised over the classes present in averages.h5), averaged
    over the replicates that drew the frame; NaN for frames never assigned.

    ``replicate_of``, ``class_of`` (A,): where each average of ``mu`` (A, zdim) came from.
    """
    from spiscape.embed.landscape import frame_coordinates
    from spiscape.io.replicate import read_replicates

    reps = read_replicates(list(replicate_files))
    res = frame_coordinates(int(num_frames), reps, replicate_of, class_of,
                            np.asarray(mu, dtype=np.float64))
    return res["coords"]


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)
