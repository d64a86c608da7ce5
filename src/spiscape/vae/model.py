"""The SPIEncoder VAE: 2D CNN encoder, 3D transposed-convolution decoder, point-group
symmetrisation and differentiable Ewald-sphere slicing.

Geometry (shared with :mod:`spiscape.simulate.frames`): ``volume[i, j, l]`` is the intensity at
q = (i, j, l) - V // 2 voxels (one voxel = one detector pixel at the centre); an average with
orientation R (scalar-first quaternion) shows I(R q) at its grid points' Ewald q.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

POINT_GROUPS = ("1", "-1", "m-3m")


# --------------------------------------------------------------------------- geometry
def ewald_grid(size: int, detd: float, ewald_rad: float) -> np.ndarray:
    """Ewald-sphere q (3, S, S) in voxels of an S x S average: grid point (i, j) sits at the flat
    detector coordinates (i - c, j - c), c = (S - 1) / 2, first axis = detector x."""
    c = (size - 1) / 2.0
    cx, cy = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    fac = np.sqrt(cx**2 + cy**2 + detd**2)
    return np.stack([cx * ewald_rad / fac, cy * ewald_rad / fac, ewald_rad * (detd / fac - 1.0)])


def quaternion_to_matrix(quats: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (n, 3, 3) of scalar-first quaternions (n, 4) (need not be normalised);
    the same convention as :func:`spiscape.simulate.frames.quaternion_to_matrix`."""
    q = quats / quats.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(q.shape[:-1] + (3, 3))


def small_rotations(delta: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (n, 3, 3) exp([delta]x) of axis-angle vectors delta (n, 3), radians:
    differentiable, the identity at 0 (pose refinement composes them with the input rotations)."""
    zero = torch.zeros_like(delta[:, 0])
    x, y, z = delta.unbind(-1)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(-1, 3, 3)
    return torch.linalg.matrix_exp(skew)


def slice_volumes(volumes: torch.Tensor, q: torch.Tensor, rotations: torch.Tensor,
                  folded: bool = False) -> torch.Tensor:
    """I_b(R_b q_t) for every volume b (B, V, V, V) and point t of q (3, P) in voxels: trilinear,
    differentiable (grid_sample, align_corners=True); points beyond the grid read 0, as in
    :func:`spiscape.simulate.frames.slice_volume`. Returns (B, P); with several rotations per
    volume, ``rotations (B, H, 3, 3)``, (B, H, P).

    ``folded``: the volumes are the octant q >= 0 (index 0 at q = 0) of volumes symmetric under
    the three sign flips; they are read at |R q|, which for such volumes is exactly what
    trilinear interpolation of the full volume gives.
    """
    B, n = volumes.shape[0], volumes.shape[-1]
    pts = torch.einsum("b...ij,jt->b...ti", rotations.to(q.dtype), q)
    pts = pts.abs() if folded else pts + (n // 2)
    # grid_sample's last grid axis indexes the input's last (W) dimension: reverse (i, j, l)
    grid = (pts.flip(-1) * (2.0 / (n - 1)) - 1.0).reshape(B, 1, 1, -1, 3)
    out = F.grid_sample(volumes.unsqueeze(1), grid.to(volumes.dtype), mode="bilinear",
                        padding_mode="zeros", align_corners=True)
    return out.reshape(rotations.shape[:-2] + (q.shape[-1],))


def tilt_ring(angle: torch.Tensor, num: int = 4) -> torch.Tensor:
    """(1 + num, 3, 3): the identity and ``num`` rotations by ``angle`` (radians, a 0-d tensor;
    differentiable) about axes in the detector plane (first two grid axes) evenly spaced in
    direction: the patch of orientations a 2D class average merges (as
    :func:`spiscape.vae.frame_posterior.tilt_rotations`, in torch)."""
    kw = {"dtype": angle.dtype, "device": angle.device}
    phi = 2.0 * math.pi * torch.arange(num, **kw) / num
    axes = torch.stack([torch.cos(phi), torch.sin(phi), torch.zeros_like(phi)], dim=1)
    return torch.cat([torch.eye(3, **kw)[None], small_rotations(axes * angle.abs())])


def unfold_octant(octant: torch.Tensor, volume_size: int) -> torch.Tensor:
    """The full V^3 volume (centre V // 2) of a flip-symmetric volume given by its octant."""
    idx = (torch.arange(volume_size, device=octant.device) - volume_size // 2).abs()
    out = octant.index_select(-3, idx).index_select(-2, idx).index_select(-1, idx)
    return out


def permutation_average(volume: torch.Tensor) -> torch.Tensor:
    """Average over the 6 permutations of the last three axes."""
    lead = volume.dim() - 3
    perms = list(itertools.permutations(range(3)))
    return sum(volume.permute(*range(lead), *(lead + p for p in perm)) for perm in perms) / 6.0


# --------------------------------------------------------------------------- symmetry
def check_point_group(name: str) -> str:
    from spiscape.errors import ConfigError

    if str(name) not in POINT_GROUPS:
        raise ConfigError(f"point group {name!r} not supported (choose from {POINT_GROUPS})")
    return str(name)


def group_operations(name: str) -> list[tuple[tuple[int, int, int], tuple[int, ...]]]:
    """(axis permutation, flipped axes) of every operation on the last three axes."""
    name = check_point_group(name)
    if name == "1":
        return [((0, 1, 2), ())]
    if name == "-1":
        return [((0, 1, 2), ()), ((0, 1, 2), (0, 1, 2))]
    flips = [tuple(a for a in range(3) if bits >> a & 1) for bits in range(8)]
    return [(p, f) for p in itertools.permutations(range(3)) for f in flips]


def apply_operation(volume: torch.Tensor, perm, flips) -> torch.Tensor:
    """One point-group operation on the last three axes (centre V // 2, odd V)."""
    lead = volume.dim() - 3
    out = volume.permute(*range(lead), *(lead + p for p in perm))
    return out.flip([lead + a for a in flips]) if flips else out


def symmetrise(volume: torch.Tensor, point_group: str) -> torch.Tensor:
    """Average of a volume (..., V, V, V) over the point group's operations.

    m-3m (48 operations) = the 6 axis permutations after the 8 sign flips, so the group average is
    the permutation average of the flip average: 3 + 6 tensor operations instead of 48.
    """
    point_group = check_point_group(point_group)
    if point_group == "1":
        return volume
    lead = volume.dim() - 3
    if point_group == "-1":
        return 0.5 * (volume + volume.flip([lead, lead + 1, lead + 2]))
    for axis in range(3):
        volume = 0.5 * (volume + volume.flip(lead + axis))
    perms = list(itertools.permutations(range(3)))
    total = sum(apply_operation(volume, p, ()) for p in perms)
    return total / len(perms)


# --------------------------------------------------------------------------- networks
class Encoder(nn.Module):
    """2D CNN on a normalised average, then fully connected layers on [features, quaternion,
    log gain] (the paper concatenates orientation to the flattened features) -> mu, log var."""

    def __init__(self, zdim: int, channels: int = 16, hidden: int = 256):
        super().__init__()
        c = channels
        self.conv = nn.Sequential(
            nn.Conv2d(2, c, 3, stride=2, padding=1), nn.LeakyReLU(0.1),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.LeakyReLU(0.1),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.LeakyReLU(0.1),
            nn.AdaptiveAvgPool2d(4),
        )
        self.fc = nn.Sequential(
            nn.Linear(4 * c * 16 + 5, hidden), nn.LeakyReLU(0.1),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.1),
            nn.Linear(hidden, 2 * zdim),
        )
        self.zdim = zdim

    def forward(self, image, support, quaternion, log_gain):
        # the support is a second channel so that 0 = "not measured" is not read as a value
        x = torch.stack([image * support, support.expand_as(image)], dim=1)
        feats = self.conv(x).flatten(1)
        out = self.fc(torch.cat([feats, quaternion, log_gain[:, None]], dim=1))
        return out[:, : self.zdim], out[:, self.zdim:]


class Decoder(nn.Module):
    """z -> fully connected -> (C, n, n, n) -> 3D transposed convolutions (x2 each) -> V^3.

    The network predicts log I relative to a fixed radial profile I_0(|q|) (the data's radial
    mean intensity), so that the untrained decoder already has the right fall-off over the
    orders of magnitude of a diffraction volume and only learns the shape: I = I_0 exp(out),
    positive by construction.
    """

    def __init__(self, zdim: int, volume_size: int, radial_log_profile: np.ndarray,
                 channels: int = 32, hidden: int = 256, upsamplings: int = 3,
                 octant: bool = False):
        super().__init__()
        if volume_size % 2 == 0:
            from spiscape.errors import ConfigError

            raise ConfigError(f"volume size must be odd (centre V // 2), got {volume_size}")
        # octant: generate only q >= 0 (index 0 at q = 0), n = V // 2 + 1 per axis
        self.octant = octant
        self.volume_size = V = volume_size // 2 + 1 if octant else volume_size
        self.base = math.ceil(V / 2**upsamplings)
        self.channels = channels
        self.fc = nn.Sequential(
            nn.Linear(zdim, hidden), nn.LeakyReLU(0.1),
            nn.Linear(hidden, channels * self.base**3), nn.LeakyReLU(0.1),
        )
        layers = []
        c = channels
        for k in range(upsamplings):
            c_out = max(c // 2, 4) if k < upsamplings - 1 else 1
            layers.append(nn.ConvTranspose3d(c, c_out, 4, stride=2, padding=1))
            if k < upsamplings - 1:
                layers.append(nn.LeakyReLU(0.1))
            c = c_out
        self.deconv = nn.Sequential(*layers)
        # start from the radial profile: last layer's output near 0
        nn.init.zeros_(self.deconv[-1].bias)
        self.deconv[-1].weight.data.mul_(0.1)
        ax = torch.arange(V, dtype=torch.float32) - (0 if octant else V // 2)
        r = torch.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)
        prof = torch.as_tensor(np.asarray(radial_log_profile, dtype=np.float32))
        self.register_buffer("log_profile", _interp_profile(prof, r))
        # a free log-volume shared by all z: fine structure common to the data (fringes) need
        # not pass through the coarse transposed convolutions; z only models the changes
        self.mean_log = nn.Parameter(torch.zeros(V, V, V))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).reshape(-1, self.channels, self.base, self.base, self.base)
        x = self.deconv(x)[:, 0]
        n = x.shape[-1]
        lo = 0 if self.octant else (n - self.volume_size) // 2
        sl = slice(lo, lo + self.volume_size)
        x = x[:, sl, sl, sl].float()
        return torch.exp(torch.clamp(x + self.mean_log + self.log_profile, max=60.0))


def _interp_profile(profile: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of a radial profile (index = |q| in voxels), held at its ends."""
    rr = torch.clamp(r, 0, profile.numel() - 1)
    i0 = torch.floor(rr).long().clamp(max=profile.numel() - 2)
    f = rr - i0
    return profile[i0] * (1 - f) + profile[i0 + 1] * f


class SPIVAE(nn.Module):
    """Encoder + decoder + symmetrisation + Ewald slicing, with the averages' q grid.

    For m-3m the decoder generates only the octant q >= 0 ((V // 2 + 1)^3, 1/8 of the voxels):
    averaging a volume over the 8 sign flips makes it a function of its octant, so the group
    average over all 48 operations is the average of the octant over the 6 axis permutations,
    and slicing reads the octant at |R q| (exactly the trilinear value of the full volume). The
    function space is that of the full decoder followed by the 48-fold average, at 1/8 of the
    cost. Other groups ("1", "-1") decode the full V^3 and average with :func:`symmetrise`.

    ``average_tilt`` (degrees, > 0): each average is predicted as the mean of the slices at its
    orientation and at a ring of 4 tilts by this angle out of its plane (:func:`tilt_ring`): a 2D
    class merges frames from a patch of orientations about its own, and a single slice makes the
    decoder round what the patch blurred. ``learn_tilt``: the angle is a parameter (``tilt``,
    radians) fitted with the decoder, ``average_tilt`` its starting value.
    """

    def __init__(self, zdim: int, volume_size: int, image_size: int, q: np.ndarray,
                 radial_log_profile: np.ndarray, point_group: str = "m-3m",
                 enc_channels: int = 16, dec_channels: int = 32, hidden: int = 256,
                 average_tilt: float = 0.0, learn_tilt: bool = False):
        super().__init__()
        self.config = dict(zdim=zdim, volume_size=volume_size, image_size=image_size,
                           point_group=check_point_group(point_group),
                           enc_channels=enc_channels, dec_channels=dec_channels, hidden=hidden,
                           average_tilt=float(average_tilt), learn_tilt=bool(learn_tilt))
        self.zdim = zdim
        self.volume_size = volume_size
        self.point_group = point_group
        self.octant = point_group == "m-3m"
        self.encoder = Encoder(zdim, enc_channels, hidden)
        self.decoder = Decoder(zdim, volume_size, radial_log_profile, dec_channels, hidden,
                               octant=self.octant)
        self.register_buffer("q", torch.as_tensor(np.asarray(q, dtype=np.float32)).reshape(3, -1))
        self.tilt = None
        if average_tilt < 0:
            raise ValueError(f"average_tilt must be >= 0 degrees, got {average_tilt}")
        if average_tilt > 0 or learn_tilt:
            self.tilt = nn.Parameter(torch.tensor(math.radians(average_tilt)),
                                     requires_grad=learn_tilt)

    def tilt_deg(self) -> float:
        """The averages' tilt (degrees; 0 when they are predicted as single slices)."""
        return 0.0 if self.tilt is None else math.degrees(abs(float(self.tilt.detach())))

    def tilts(self) -> torch.Tensor | None:
        """The rotations (T, 3, 3) each average's slice is averaged over, or None (one slice)."""
        if self.tilt is None:
            return None
        return tilt_ring(self.tilt)

    def symmetric(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's output after the point-group average: the octant for m-3m."""
        raw = self.decoder(z)
        if self.octant:
            return permutation_average(raw)
        return symmetrise(raw, self.point_group)

    def volumes(self, z: torch.Tensor) -> torch.Tensor:
        """Symmetrised intensity volumes (B, V, V, V) at latent points z (B, zdim)."""
        sym = self.symmetric(z)
        return unfold_octant(sym, self.volume_size) if self.octant else sym

    def set_merge(self, points: np.ndarray | None, matrix=None) -> None:
        """Predict averages as the EMC merges them (:mod:`spiscape.vae.merge`): slice at
        ``points (3, K P)`` and apply the sparse ``matrix (S^2, K P)``; None: plain slices.
        Not part of the state dict (a property of the data, not of the model)."""
        if points is None:
            self.merge_points = self.merge_matrix = None
            return
        coo = matrix.tocoo()
        device = self.q.device
        self.merge_points = torch.as_tensor(points, dtype=torch.float32, device=device)
        self.merge_matrix = torch.sparse_coo_tensor(
            np.stack([coo.row, coo.col]), coo.data.astype(np.float32), coo.shape,
            device=device, check_invariants=True).coalesce()

    def _apply(self, fn, *args, **kwargs):  # .to(device) moves the merge with the buffers
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "merge_points", None) is not None:
            self.merge_points = fn(self.merge_points)
            self.merge_matrix = fn(self.merge_matrix)
        return out

    def forward(self, image, support, quaternion, log_gain, sample: bool = True, pose_delta=None,
                log_scale=None):
        """Predicted averages (B, S, S), mu, logvar. ``pose_delta`` (B, 3), optional: small
        rotations (axis-angle, radians) applied after each quaternion's rotation when slicing
        (pose refinement); the encoder always sees the input quaternion. ``log_scale`` (B,),
        optional: each average's particle is exp(log_scale) times the size of the decoded one,
        so it is sliced at exp(log_scale) R q (a size spread as a nuisance, not in z)."""
        mu, logvar = self.encoder(image, support, quaternion, log_gain)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        vols = self.symmetric(z)
        rot = quaternion_to_matrix(quaternion.float())
        if pose_delta is not None:
            rot = rot @ small_rotations(pose_delta.float())
        if log_scale is not None:
            rot = rot * torch.exp(log_scale.float())[:, None, None]
        ring = self.tilts()
        if ring is not None:  # (B, T, 3, 3): the patch's slices, averaged below
            rot = rot[:, None] @ ring.to(rot.dtype)[None]
        if getattr(self, "merge_points", None) is not None:
            with torch.autocast(vols.device.type, enabled=False):
                pts = slice_volumes(vols.float(), self.merge_points, rot, folded=self.octant)
                if ring is not None:
                    pts = pts.mean(1)
                pred = torch.sparse.mm(self.merge_matrix, pts.T).T
            return pred.reshape(image.shape), mu, logvar
        pred = slice_volumes(vols.float(), self.q.float(), rot, folded=self.octant)
        if ring is not None:
            pred = pred.mean(1)
        return pred.reshape(image.shape), mu, logvar


def poisson_loss(pred, counts, weight):
    """Per-average Poisson deviance (mean over measured pixels) with the scale fitted in closed
    form: s = sum k / sum lambda (the Poisson maximum-likelihood scale), so that neither the
    fluence nor the absolute intensity of the decoder matters."""
    pred = pred.flatten(1).float()
    counts = counts.flatten(1).float()
    weight = weight.float().reshape(-1, counts.shape[1])  # (S, S) shared or (B, S, S)
    scale = (counts * weight).sum(1) / (pred * weight).sum(1).clamp_min(1e-30)
    lam = (pred * scale[:, None]).clamp_min(1e-12)
    dev = lam - counts + counts * torch.log(torch.where(counts > 0, counts, 1.0) / lam)
    dev = torch.where(counts > 0, dev, lam)
    return 2.0 * (dev * weight).sum(1) / weight.sum(1).clamp_min(1.0), scale


def kl_divergence(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) per sample, summed over latent dimensions."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
