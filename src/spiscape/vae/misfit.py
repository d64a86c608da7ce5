"""Averages the trained decoder cannot explain: each one's misfit at its own latent, orientation
and size, and the outliers among the averages trained on.

The decoder's volumes are m-3m symmetric and vary along one latent, so an average of a species
beside the series (a spheroid, a rod or a dimer that the landscape's clusters let in) is fitted
worse than the series' own averages. On the validation matrix such averages, a few per set,
decided where the latent's sphere end went: with VAE seed 2 they sat at or beyond it and the
decoded sphere end was anisotropic and would not phase (`df64` +47.5 %, `df96low` +113.7 % sphere
/ cube volume error); with the contaminant averages left out the same seed read +5.6 % and
+4.9 % (docs/validation.md, "Contaminant averages in the VAE").

The misfit of average a is the relative squared residual over the pixels in the loss,

    m_a = sum_t (x_at - s_a p_at)^2 / sum_t x_at^2,   s_a = sum_t x_at / sum_t p_at,

with p_a the decoder's slice at (mu_a, R_a, its size offset), averaged over the model's ring of
tilts when it predicts averages that way (``SPIVAE.tilts``); an outlier has a robust z-score of
log m_a (median and 1.4826 MAD over the averages trained on) above a limit.
"""

from __future__ import annotations

import numpy as np
import torch


def average_misfit(model, intens: np.ndarray, weight: np.ndarray, mu: np.ndarray,
                   quaternion: np.ndarray, log_scale: np.ndarray, index) -> np.ndarray:
    """Relative squared residual (len(index),) of the averages ``index`` (``intens`` (A, S, S),
    ``weight`` (S^2,) bool, the pixels in the loss) against the decoder's slices at their latents
    ``mu`` (A, zdim), orientations ``quaternion`` (A, 4) and log sizes ``log_scale`` (A,)."""
    from spiscape.vae.frame_posterior import class_models

    index = np.asarray(index, dtype=np.int64)
    weight = np.asarray(weight, dtype=bool).ravel()
    out = np.empty(index.size)
    with torch.no_grad():
        vols = model.symmetric(torch.as_tensor(np.asarray(mu)[index], dtype=torch.float32,
                                               device=model.q.device))
        ring = model.tilts()
    ring = [None] if ring is None else list(ring.cpu().numpy())
    for i, a in enumerate(index):
        pred = np.mean([class_models(model, vols[i:i + 1], quaternion[a], float(log_scale[a]),
                                     0.0, tilt)[0] for tilt in ring], axis=0)
        pred = pred[weight]
        obs = np.asarray(intens[a], dtype=np.float64).ravel()[weight]
        scale = obs.sum() / max(pred.sum(), 1e-300)
        out[i] = np.sum((obs - scale * pred) ** 2) / max(np.sum(obs**2), 1e-300)
    return out


def robust_z(values: np.ndarray) -> np.ndarray:
    """(v - median) / (1.4826 MAD): a z-score that a few outliers do not inflate (0 where the
    values do not spread)."""
    values = np.asarray(values, dtype=np.float64)
    centre = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - centre))
    if spread <= 0:
        return np.zeros_like(values)
    return (values - centre) / spread


def misfit_z(misfit: np.ndarray) -> np.ndarray:
    """Robust z-score of each log misfit among them."""
    return robust_z(np.log(np.maximum(np.asarray(misfit, dtype=np.float64), 1e-300)))

