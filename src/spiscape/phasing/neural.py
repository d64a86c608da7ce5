"""Neural phase retrieval: a 3D U-Net predicts the density from the measured intensities, and a
short iterative refinement starts from that prediction instead of random phases.

Input (:func:`patterson_features`): the network does not see the amplitudes in Fourier space
but their physics in real space, the Patterson map P = F^-1[I M] (the autocorrelation of the
density less what the unmeasured voxels M = 0 carry), on the window |r| <= N // 4 that holds a
phasable particle (one wider than half the box has an autocorrelation that wraps around):

- channel 0: P(2r) / P(0). For a convex centrosymmetric particle K the autocorrelation's support
  is 2K, so P(2r) > 0 exactly on K: the shape is read off locally, and a small convolutional
  network only has to correct the edges, concave shapes (dimers) and the unmeasured voxels;
- channel 1: P(r) / P(0), the autocorrelation at full resolution near its centre;
- channel 2: the point-spread function of the unmeasured voxels, F^-1[1 - M](2r) / F^-1[1 - M](0)
  (0 when all are measured): P is the true autocorrelation minus its convolution with this, so
  the mask is marked in the same real-space frame as the data (the issue's mask channel).

The network is fully convolutional on that window, so one set of weights phases any grid size
(the window is N // 4 wide; particles are sized in voxels, and sizes outside those it was trained
on draw a warning). Output: the density in the window, centred, scaled to a maximum of 1; the
twin (r -> -r) is not determined by intensities, so training takes the better of the two
(:func:`twin_loss`).

Refinement (:func:`phase_from_prediction`): the prediction scaled to the measured amplitudes
is the start, its support (``support_fraction`` of its maximum, dilated by
``support_dilation``) bounds the shrink-wrap, and the recipe runs on the one start. The result
is trusted (``converged``) when the refined density still agrees with the prediction (aligned
CC >= ``agree_cc`` at the prediction's resolution, both blurred by ``agree_sigma``): two routes
to the same density. Otherwise the caller falls back to random
starts.

Weights files hold only tensors and plain values (``torch.load(weights_only=True)``): keys
``state_dict``, ``settings`` (network widths, the training settings and synthetic-data
settings), ``sha256`` (of the state dict's tensors, checked on load), ``history``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from torch import nn

from spiscape.errors import InputError

log = logging.getLogger(__name__)

#: the model shipped with the package, trained on the default 61^3 grid
#: (``spiscape train-phaser``; command and curve in the README)
SHIPPED_MODEL = "phaser61.pt"


# --------------------------------------------------------------------------- features
def window_half(n: int) -> int:
    return n // 4


def _centred_ifft(volume: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(volume)).real)


def centred_window(volume: np.ndarray, half: int, step: int) -> np.ndarray:
    """volume[c + step * r] for r in [-half, half]^3, periodic (c = N // 2 on every axis)."""
    idx = [(n // 2 + step * np.arange(-half, half + 1)) % n for n in volume.shape]
    return volume[np.ix_(*idx)]


def patterson_features(intens: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """The network's input (3, W, W, W), W = 2 (N // 4) + 1, float32 (module docstring)."""
    intens = np.asarray(intens, dtype=np.float64)
    mask = np.asarray(measured, dtype=bool) & np.isfinite(intens)
    data = np.where(mask, np.clip(intens, 0.0, None), 0.0)
    patterson = _centred_ifft(data)
    h = window_half(intens.shape[0])
    centre = patterson[tuple(n // 2 for n in intens.shape)]
    if not centre > 0:
        raise InputError("intensities", "no measured intensity to phase")
    psf = _centred_ifft((~mask).astype(np.float64))
    psf_centre = psf[tuple(n // 2 for n in intens.shape)]
    psf = psf / psf_centre if psf_centre > 0 else np.zeros_like(psf)
    out = np.stack([centred_window(patterson, h, 2) / centre,
                    centred_window(patterson, h, 1) / centre, centred_window(psf, h, 2)])
    return out.astype(np.float32)


def place_window(window: np.ndarray, n: int) -> np.ndarray:
    """A centred window (W^3) placed in the middle of an N^3 grid of zeros."""
    h = window.shape[0] // 2
    out = np.zeros((n,) * 3, dtype=window.dtype)
    sl = slice(n // 2 - h, n // 2 + h + 1)
    out[sl, sl, sl] = window
    return out


# --------------------------------------------------------------------------- network
class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv3d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU(),
            nn.Conv3d(cout, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU(),
        )


class PhaserNet(nn.Module):
    """3D U-Net: ``widths`` channels per level, max-pooling down, transposed convolutions up,
    skip connections; input any size (padded to a multiple of 2^levels), output the same size,
    a density in [0, 1] (sigmoid)."""

    def __init__(self, widths=(16, 32, 64), in_channels: int = 3):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.down = nn.ModuleList()
        cin = in_channels
        for w in self.widths:
            self.down.append(_Block(cin, w))
            cin = w
        self.bottom = _Block(cin, 2 * cin)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        cin = 2 * cin
        for w in reversed(self.widths):
            self.up.append(nn.ConvTranspose3d(cin, w, 2, stride=2))
            self.merge.append(_Block(2 * w, w))
            cin = w
        self.head = nn.Conv3d(cin, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        step = 2 ** len(self.widths)
        pad = (-size) % step
        if pad:
            x = nn.functional.pad(x, (0, pad) * 3)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = nn.functional.max_pool3d(x, 2)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips), strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
        x = torch.sigmoid(self.head(x))
        return x[:, 0, :size, :size, :size]


def twin_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of min(MSE(pred, target), MSE(pred, target inverted through the
    window's centre)): intensities cannot tell a density from its twin."""
    direct = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    twin = ((pred - target.flip(1, 2, 3)) ** 2).mean(dim=(1, 2, 3))
    return torch.minimum(direct, twin).mean()


# --------------------------------------------------------------------------- weights files
def state_digest(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def write_weights(path, model: nn.Module, settings: dict, **extra) -> None:
    """The weights file (module docstring), written atomically; float16 halves the shipped
    file (load_state_dict casts back to float32)."""
    from spiscape.io.weights import plain
    from spiscape.utils.atomic import atomic_path

    state = {k: v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(plain({"state_dict": state, "sha256": state_digest(state),
                          "settings": settings, **extra}), tmp)


@dataclass
class LoadedPhaser:
    model: PhaserNet
    settings: dict
    path: str
    sha256: str


def load_phaser(path=None) -> LoadedPhaser:
    """A weights file (default: the shipped model), checked: a dict with a state dict whose
    hash matches; InputError naming the file otherwise."""
    from spiscape.io.weights import load_plain

    if path is None:
        path = shipped_model_path()
        if path is None:
            raise InputError(SHIPPED_MODEL, "no neural phaser is shipped with this installation; "
                             "train one with `spiscape train-phaser` and pass --phaser-model")
    data = load_plain(path, "neural phaser")
    if not isinstance(data, dict) or not isinstance(data.get("state_dict"), dict):
        raise InputError(path, "not a neural phaser weights file (no state_dict)")
    settings = data.get("settings") or {}
    digest = state_digest(data["state_dict"])
    if data.get("sha256") and data["sha256"] != digest:
        raise InputError(path, "weights hash mismatch: the file is corrupt or was edited")
    model = PhaserNet(widths=tuple(settings.get("widths", (16, 32, 64))))
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as exc:
        raise InputError(path, f"weights do not fit the network: {str(exc).splitlines()[0]}") \
            from None
    model.eval()
    return LoadedPhaser(model=model, settings=settings, path=str(path), sha256=digest)


def shipped_model_path():
    """Path of the shipped model, or None when this installation has none."""
    ref = resources.files("spiscape.phasing").joinpath("models", SHIPPED_MODEL)
    return str(ref) if ref.is_file() else None


# --------------------------------------------------------------------------- prediction
def predict(phaser: LoadedPhaser, intens: np.ndarray, measured: np.ndarray,
            device: str = "cpu") -> np.ndarray:
    """The network's density on the full grid (N^3, max 1, centred); the window elsewhere 0."""
    n = intens.shape[0]
    if intens.ndim != 3 or len(set(intens.shape)) != 1:
        raise InputError("intensities", f"the neural phaser takes cubic 3D volumes, got "
                         f"{intens.shape}")
    features = patterson_features(intens, measured)
    _check_size(phaser, features, n)
    x = torch.from_numpy(features)[None].to(device)
    with torch.no_grad():
        out = phaser.model.to(device)(x)[0].float().cpu().numpy()
    return place_window(out, n)


def particle_extent(features: np.ndarray, level: float = 0.05) -> float:
    """Rough largest extent (voxels) of the particle, from the region about the centre where
    P(2r) exceeds ``level`` of P(0) (channel 0 of the features; the ripples that the
    unmeasured low-q voxels leave beyond it are not connected to it)."""
    from scipy import ndimage

    from spiscape.phasing.align import centred_radius

    h = features.shape[-1] // 2
    r = centred_radius(features.shape[1:])
    labels, _ = ndimage.label(features[0] > level)
    core = labels == labels[h, h, h]
    # the region spans the particle (P(2r) > 0 on it) when every q is measured and less when
    # the missing low q cut a moat into the central peak: 3 x its radius reads a sphere's
    # diameter within ~25 % in both cases (tests/test_phasing_nn.py)
    return 3.0 * float(r[core].max()) if labels[h, h, h] else 0.0


def _check_size(phaser: LoadedPhaser, features: np.ndarray, n: int) -> None:
    """Say when the grid is not the one the model was trained at, and warn when the particle's
    extent (from the Patterson map) is outside the range it was trained on."""
    synth = phaser.settings.get("synth", {})
    grid = synth.get("grid")
    if grid and grid != n:
        log.info("neural phaser trained at %d^3 applied at %d^3 (fully convolutional on the "
                 "Patterson window; no resampling)", grid, n)
    if grid and synth.get("size_min") is not None:
        lo, hi = synth["size_min"] * grid, synth["size_max"] * grid
        extent = particle_extent(features)
        if not 0.5 * lo <= extent <= 1.5 * hi:
            log.warning("particle extent ~%.0f voxels is outside the %.0f-%.0f voxels the neural "
                        "phaser was trained on; its prediction may be poor (the refinement and "
                        "the fallback to random starts still apply)", extent, lo, hi)


def outside_training(phaser: LoadedPhaser, q_min: float, q_max: float, n: int) -> str | None:
    """Why data with this measured shell (voxels) on an N^3 grid is outside what the model was
    trained on, or None. A beamstop wider than the trained ones hides more of the central
    speckle than the network has learnt to fill in: on the validation matrix the two sets with
    beamstops of 5.4 and 6.1 voxels (trained up to 5) phased 1.4-9x too large."""
    synth = phaser.settings.get("synth", {})
    limit = synth.get("q_min_max")
    if limit is not None and q_min > limit + 1e-6:
        return (f"the beamstop (|q| < {q_min:.2f} voxels) is wider than any the neural phaser "
                f"was trained on ({limit:g} voxels)")
    lo, hi = synth.get("q_max_fraction", (0.0, 0.5))
    if np.isfinite(q_max) and not 0.8 * lo * n <= q_max <= n / 2 + 1:
        return (f"the measured q_max ({q_max:.1f} voxels) is outside the neural phaser's "
                f"training range ({lo * n:.0f}-{hi * n:.0f} voxels)")
    return None


def scale_to_amplitudes(density: np.ndarray, intens: np.ndarray, measured: np.ndarray):
    """The density times the least-squares factor matching |F| to sqrt(I) on measured voxels."""
    from spiscape.phasing.algorithms import amplitudes_and_mask

    amp, mask = amplitudes_and_mask(intens, measured)
    mag = np.abs(np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(density))))
    num = float(np.sum(mag[mask] * amp[mask]))
    den = float(np.sum(mag[mask] ** 2))
    return density * (num / den if den > 0 else 1.0)


# --------------------------------------------------------------------------- phasing
#: the refinement of a prediction: shrink-wrap during RAAR within the prediction's dilated
#: support, then ER on the final support (measured in bench/phasing.py)
REFINE_RECIPE = "30 RAAR 30 ER"
METHODS = ("iterative", "nn", "nn+refine")


@dataclass
class NeuralSettings:
    refine_recipe: str = REFINE_RECIPE
    support_fraction: float = 0.1  # of the prediction's maximum
    support_dilation: int = 2  # voxels
    agree_cc: float = 0.8  # refined vs predicted density, aligned ...
    agree_sigma: float = 1.0  # ... both blurred by this Gaussian (voxels): the prediction's
    # resolution is lower than the refined density's (a sharp cube and the network's rounded
    # one: CC 0.80 unblurred, 0.88 blurred; a refinement gone astray stays below)
    device: str = "cpu"  # torch device of the network


def prediction_support(pred: np.ndarray, fraction: float, dilation: int) -> np.ndarray:
    from scipy import ndimage

    support = pred >= fraction * float(pred.max())
    return ndimage.binary_dilation(support, iterations=dilation) if dilation > 0 else support


def phase_with_network(intens, phaser: LoadedPhaser, params, settings: NeuralSettings,
                       xp=np, measured=None, refine: bool = True):
    """Phase one centred 3D intensity volume from the network's prediction.

    ``refine=False`` returns the prediction itself (scaled to the amplitudes; its ``errors``
    hold the support error of its Fourier projection, ``converged`` is True: there is no
    second estimate to check it against). ``refine=True`` refines it with
    ``settings.refine_recipe`` (shrink-wrap settings from ``params``); ``converged`` says whether
    the refined density agrees with the prediction (module docstring).
    """
    from dataclasses import replace

    from spiscape.phasing import phase_from_start, result_from_aligned
    from spiscape.phasing.algorithms import FFT, Phaser

    if measured is None:
        measured = np.ones(intens.shape, dtype=bool)
    pred = predict(phaser, intens, measured, settings.device)
    if not pred.max() > 0:
        raise InputError("intensities", "the neural phaser predicted an empty density")
    start = scale_to_amplitudes(pred, intens, measured).astype(np.float32)
    support = prediction_support(pred, settings.support_fraction, settings.support_dilation)
    if refine:
        return phase_from_start(intens, replace(params, recipe=settings.refine_recipe),
                                start[None], support, xp=xp, measured=measured, reference=start,
                                agree_cc=settings.agree_cc, agree_sigma=settings.agree_sigma)
    ph = Phaser(intens, params, xp=xp, measured=measured)
    rho = xp.asarray(start[None])
    sup = xp.asarray(support[None])
    error = ph.support_error(ph.project_fourier(rho), sup)[None]
    specs = FFT(xp, intens.shape).forward(rho)
    return result_from_aligned(xp, np.array([0]), sup, rho, specs, np.array([False]), error,
                               intens, measured, converged=True, rounds=1)


def phase_volume(intens, method: str, phaser: LoadedPhaser | None, params,
                 settings: NeuralSettings, xp=np, measured=None):
    """Phase one volume with ``method``; returns (PhasingResult, the method that gave it).

    ``nn+refine`` falls back to random starts (:func:`spiscape.phasing.phase_pattern`) when the
    refinement departs from the prediction: the network was out of its depth there.
    """
    from spiscape.phasing import phase_pattern

    if method == "iterative":
        return phase_pattern(intens, params, xp=xp, measured=measured), "iterative"
    if method not in METHODS or phaser is None:
        raise InputError("--method", f"{method!r} needs a neural phaser model")
    res = phase_with_network(intens, phaser, params, settings, xp=xp, measured=measured,
                             refine=method == "nn+refine")
    if method == "nn+refine" and not res.converged:
        log.warning("the refinement departed from the network's prediction (aligned CC < %.2f): "
                    "phased from %d random starts instead", settings.agree_cc, params.starts)
        return phase_pattern(intens, params, xp=xp, measured=measured), "iterative"
    return res, method
