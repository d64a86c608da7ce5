"""Frames for the amortised model, streamed in blocks: the pixels it uses, each frame densified
onto a small image for the encoder, the radial profile the decoder starts from.

Memory is bounded by one block of frames (``block_frames`` sparse frames plus one batch of dense
ones), whatever the number of frames in the files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spiscape.errors import InputError
from spiscape.simulate.detector import q_magnitude
from spiscape.vae.data import fill_from_nearest


@dataclass
class Pixels:
    """The pixels of the likelihood and of the encoder's image."""

    index: np.ndarray  # (P,) detector pixel indices (mask 0, inside the decoder's grid)
    q: np.ndarray  # (3, P) voxels
    qnorm: np.ndarray  # (P,)
    corr: np.ndarray  # (P,)
    background: np.ndarray | None  # (P,) or None
    image_index: np.ndarray  # (P,) flat index into the S x S image
    image_size: int  # S


def select_pixels(det, volume_size: int, image_max: int = 64) -> Pixels:
    """Pixels with mask 0 whose q lies inside the sphere the V³ grid holds at any rotation; the
    encoder's image bins the detector plane by the smallest integer factor that brings its side
    to at most ``image_max``."""
    qnorm_all = q_magnitude(det)
    keep = (np.asarray(det.mask) == 0) & (qnorm_all <= volume_size // 2 - 1)
    if not keep.any():
        raise InputError(None, "no used pixel (mask 0) inside the decoder's grid")
    index = np.flatnonzero(keep)
    cx, cy = det.coords_2d()
    cx, cy = cx[index], cy[index]
    half_det = int(np.ceil(max(np.abs(cx).max(), np.abs(cy).max())))
    binning = max(1, int(np.ceil((2 * half_det + 1) / image_max)))
    ix, iy = np.rint(cx / binning).astype(int), np.rint(cy / binning).astype(int)
    half = int(max(np.abs(ix).max(), np.abs(iy).max()))
    size = 2 * half + 1
    bg = None if det.background is None else np.asarray(det.background)[index]
    return Pixels(index=index, q=np.stack([det.qx, det.qy, det.qz])[:, index],
                  qnorm=qnorm_all[index], corr=np.asarray(det.corr)[index], background=bg,
                  image_index=(iy + half) * size + (ix + half), image_size=size)


def block_bounds(num_frames: int, block_frames: int) -> list[tuple[int, int]]:
    return [(a, min(a + block_frames, num_frames)) for a in range(0, num_frames, block_frames)]


def read_frames(dataset, pixels: Pixels, frames):
    """Counts (n, P) CSR float32 of ``frames`` (a slice or indices) on the selected pixels."""
    return dataset.read(frames).to_csr()[:, pixels.index].astype(np.float32).tocsr()


def read_block(dataset, pixels: Pixels, start: int, stop: int):
    """Counts (n, P) CSR float32 of frames [start, stop) on the selected pixels."""
    return read_frames(dataset, pixels, slice(start, stop))


class Densifier:
    """Dense batches for the model: counts (B, P), the encoder's image (B, S, S) of
    log(1 + binned counts), the image's support (S, S) and log photons per frame (B,)."""

    def __init__(self, pixels: Pixels, device):
        self.device = device
        self.size = pixels.image_size
        self.image_index = torch.as_tensor(pixels.image_index, device=device)
        support = np.zeros(self.size**2, dtype=np.float32)
        support[pixels.image_index] = 1.0
        self.support = torch.as_tensor(support.reshape(self.size, self.size), device=device)

    def __call__(self, csr_rows):
        counts = torch.as_tensor(csr_rows.toarray(), device=self.device)
        image = torch.zeros(counts.shape[0], self.size**2, device=self.device)
        image.index_add_(1, self.image_index, counts)
        image = torch.log1p(image).reshape(-1, self.size, self.size)
        log_photons = torch.log(counts.sum(1).clamp_min(1.0))
        return counts, image, self.support, log_photons


def radial_log_profile(dataset, pixels: Pixels, volume_size: int, frames: int = 2048):
    """log of the mean counts per pixel / corr in integer |q| shells over the first ``frames``
    frames (background subtracted), shells without pixels taking their nearest neighbour's:
    the decoder's starting fall-off (index = |q|)."""
    counts = read_block(dataset, pixels, 0, min(frames, dataset.num_frames))
    mean = np.asarray(counts.mean(axis=0)).ravel()
    if pixels.background is not None:
        mean = mean - pixels.background
    signal = mean / pixels.corr
    nbins = volume_size // 2 + 2
    shell = np.minimum(np.rint(pixels.qnorm).astype(int), nbins - 1)
    sums = np.bincount(shell, weights=signal, minlength=nbins)
    num = np.bincount(shell, minlength=nbins)
    filled = (num > 0) & (sums > 0)
    if not filled.any():
        raise InputError(None, "the frames have no photon on the pixels the model uses")
    prof = fill_from_nearest(np.where(filled, sums / np.maximum(num, 1), 0.0), filled)
    return np.log(prof / prof.max())
