"""The amortised model: a frame encoder, the VAE's symmetric 3D decoder and the differentiable
SPI forward model that ties them to the photons.

For frame d with photons k_dt on the used pixels t, the encoder gives H rotation hypotheses
R_dh (continuous 6D representation, Zhou et al. 2019), a conformation z_d ~ N(mu_d, sigma_d²)
and, through the decoder, the 3D intensity I_z. The expected counts are

    lambda_dht = phi_dh c_t I_z(R_dh q_t) + b_t,

with q_t the pixel's point on the Ewald sphere (the detector file's ``qx qy qz``, curvature
included), c_t its solid angle x polarisation, b_t the detector's background (0 when it has
none) and phi_dh the Poisson maximum-likelihood scale of the frame at that pose (closed form
without background, three fixed-point steps with it): the fluence of the frame. The loss is the
negative ELBO with a relaxed best-of-H (winner-takes-all) likelihood,

    L_d = (1 - eps) min_h NLL_dh + eps mean_h NLL_dh + KL(q(z_d) || N(0, 1)),

NLL_dht = lambda_dht - k_dt log lambda_dht summed over pixels: a cube's views are ambiguous
under its point group, so one continuous map from frames to rotations cannot be right
everywhere, while one of several hypotheses can (cryoAI / X-RAI's multi-head pose encoders).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from spiscape.vae.model import (
    Decoder,
    permutation_average,
    slice_volumes,
    symmetrise,
    unfold_octant,
)


def rotation_6d(x: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) from 6D vectors (..., 6): Gram-Schmidt of two columns."""
    a, b = x[..., :3], x[..., 3:]
    e1 = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    b = b - (e1 * b).sum(-1, keepdim=True) * e1
    e2 = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    e3 = torch.cross(e1, e2, dim=-1)
    return torch.stack([e1, e2, e3], dim=-1)


class FrameEncoder(nn.Module):
    """2D CNN on one densified frame (log(1 + counts), used-pixel mask) -> H 6D rotations and
    the conformation's mean and log variance."""

    def __init__(self, zdim: int, hypotheses: int, channels: int = 32, hidden: int = 256):
        super().__init__()
        c = channels
        self.conv = nn.Sequential(
            nn.Conv2d(2, c, 3, padding=1), nn.LeakyReLU(0.1),
            nn.Conv2d(c, c, 3, stride=2, padding=1), nn.LeakyReLU(0.1),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.LeakyReLU(0.1),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.LeakyReLU(0.1),
            nn.Conv2d(4 * c, 4 * c, 3, stride=2, padding=1), nn.LeakyReLU(0.1),
            nn.AdaptiveAvgPool2d(4),
        )
        self.fc = nn.Sequential(nn.Linear(4 * c * 16 + 1, hidden), nn.LeakyReLU(0.1),
                                nn.Linear(hidden, hidden), nn.LeakyReLU(0.1))
        self.pose = nn.Linear(hidden, 6 * hypotheses)
        self.latent = nn.Linear(hidden, 2 * zdim)
        self.hypotheses, self.zdim = hypotheses, zdim

    def forward(self, image: torch.Tensor, support: torch.Tensor, log_photons: torch.Tensor):
        x = torch.stack([image, support.expand_as(image)], dim=1)
        h = self.fc(torch.cat([self.conv(x).flatten(1), log_photons[:, None]], dim=1))
        rot = rotation_6d(self.pose(h).float().reshape(-1, self.hypotheses, 6))
        lat = self.latent(h).float()
        return rot, lat[:, : self.zdim], lat[:, self.zdim:].clamp(-12.0, 6.0)


def poisson_nll(weights: torch.Tensor, counts: torch.Tensor, background=None):
    """Negative log-likelihood (B, H) of the counts (B, P) under lambda = phi w + b for the
    pose-dependent signal w (B, H, P), with the frame's maximum-likelihood scale phi (B, H)
    (closed form without background; three fixed-point steps with it). Constant log k! left out."""
    k = counts[:, None, :]
    total_k = k.sum(-1)
    total_w = weights.sum(-1).clamp_min(1e-30)
    phi = total_k / total_w
    if background is not None:
        for _ in range(3):
            lam = phi[..., None] * weights + background
            phi = phi * (k * weights / lam.clamp_min(1e-30)).sum(-1) / total_w
    lam = phi[..., None] * weights
    if background is not None:
        lam = lam + background
    nll = lam.sum(-1) - (k * torch.log(lam.clamp_min(1e-12))).sum(-1)
    return nll, phi


class AmortisedModel(nn.Module):
    """Encoder + symmetric decoder + Ewald slicing at the detector's pixels.

    The decoder is :class:`spiscape.vae.model.Decoder` with the VAE's settings, so a trained
    VAE's decoder is a warm start (:meth:`load_vae_decoder`); m-3m decodes the octant and reads
    it at |R q| as the VAE does.
    """

    def __init__(self, zdim: int, volume_size: int, radial_log_profile: np.ndarray,
                 q: np.ndarray, corr: np.ndarray, background: np.ndarray | None = None,
                 point_group: str = "m-3m", hypotheses: int = 8, enc_channels: int = 32,
                 dec_channels: int = 32, hidden: int = 256, wta_relax: float = 0.05):
        super().__init__()
        self.config = dict(zdim=zdim, volume_size=volume_size, point_group=point_group,
                           hypotheses=hypotheses, enc_channels=enc_channels,
                           dec_channels=dec_channels, hidden=hidden, wta_relax=wta_relax)
        self.zdim, self.volume_size, self.point_group = zdim, volume_size, point_group
        self.octant = point_group == "m-3m"
        self.wta_relax = wta_relax
        self.encoder = FrameEncoder(zdim, hypotheses, enc_channels, hidden)
        self.decoder = Decoder(zdim, volume_size, radial_log_profile, dec_channels, hidden,
                               octant=self.octant)
        self.register_buffer("q", torch.as_tensor(np.asarray(q, dtype=np.float32)))
        self.register_buffer("corr", torch.as_tensor(np.asarray(corr, dtype=np.float32)))
        self.has_background = background is not None
        if background is not None:
            self.register_buffer("background",
                                 torch.as_tensor(np.asarray(background, dtype=np.float32)))

    # ------------------------------------------------------------------ volumes
    def symmetric(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's output after the point-group average (the octant for m-3m)."""
        raw = self.decoder(z)
        return permutation_average(raw) if self.octant else symmetrise(raw, self.point_group)

    def volumes(self, z: torch.Tensor) -> torch.Tensor:
        sym = self.symmetric(z)
        return unfold_octant(sym, self.volume_size) if self.octant else sym

    def load_vae_decoder(self, vae_state: dict) -> None:
        """Copy a trained VAE's decoder (same zdim, volume size, channels and point group)."""
        prefix = "decoder."
        state = {k[len(prefix):]: v for k, v in vae_state.items() if k.startswith(prefix)}
        self.decoder.load_state_dict(state)

    def load_volume(self, volume: np.ndarray) -> None:
        """Warm start from one intensity volume (V, V, V), centred at V // 2, e.g. an emc3d
        model: the decoder's free log-volume takes it exactly and its z-dependent part starts
        at 0, so every z decodes this volume until training moves them apart."""
        from spiscape.metrics.volumes import centre_crop

        vol = np.asarray(volume, dtype=np.float64)
        size = self.volume_size
        if vol.shape[0] < size:
            pad = (size - vol.shape[0] + 1) // 2
            vol = np.pad(vol, pad, mode="edge")
        vol = centre_crop(vol, size)
        vol = np.maximum(vol, 1e-6 * vol.max())
        if self.octant:
            vol = vol[size // 2:, size // 2:, size // 2:]
        dec = self.decoder
        with torch.no_grad():
            dec.deconv[-1].weight.zero_()
            dec.deconv[-1].bias.zero_()
            target = torch.log(torch.as_tensor(vol, dtype=torch.float32))
            dec.mean_log.copy_(target - dec.log_profile)

    # ------------------------------------------------------------------ forward model
    def signal(self, vols: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """c_t I(R q_t) (B, H, P) of the symmetrised volumes (B, ...) at rotations (B, H, 3, 3)."""
        with torch.autocast(vols.device.type, enabled=False):
            return slice_volumes(vols.float(), self.q, rot.float(), folded=self.octant) \
                * self.corr

    def nll(self, vols, rot, counts):
        bg = self.background if self.has_background else None
        with torch.autocast(vols.device.type, enabled=False):
            return poisson_nll(self.signal(vols, rot), counts.float(), bg)

    def forward(self, image, support, log_photons, counts, sample: bool = True):
        """Per-frame loss terms: the relaxed best-of-H NLL (B,), KL (B,), and the index of the
        best hypothesis (B,)."""
        rot, mu, logvar = self.encoder(image, support, log_photons)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        nll, _ = self.nll(self.symmetric(z), rot, counts)
        best = nll.min(1)
        relaxed = (1.0 - self.wta_relax) * best.values + self.wta_relax * nll.mean(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
        return relaxed, kl, best.indices
