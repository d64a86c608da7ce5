"""The frames of one rank as the EMC engine reads them: blocks of photons, dense where the
detector is bright and sparse where it is dark, cached in memory or streamed from the photon files.

Cost model. The E-step's log-likelihood ``Σ_t K_dt log W_tj`` and the M-step's ``Σ_d P_dj K_dt``
are products of the photon matrix K (frames × pixels) with a dense matrix of views. A dense
product (BLAS, cuBLAS) costs ``frames × pixels × views`` at the machine's full matrix rate; a
sparse one (CSR, cuSPARSE) costs ``photons × views`` at a far lower rate per term. Which is faster
depends on the pixel: near the beam most frames have a photon there, at the edge of a large
detector almost none do. Pixels are therefore ordered by their photon density (the fraction of
frames with a photon on them), the bright ones are held as a dense block and the dark ones as CSR,
and the split is where a pixel costs the same both ways: density = dense rate / sparse rate, the
two rates measured on this machine on the data's first frames (:func:`measure_crossover`) unless
given (``sparse_below``). A demo-like detector (a few thousand pixels, thousands of photons a
frame) comes out all dense; 128² pixels at a few hundred photons all sparse.

Memory. Frames are read once to count photons per pixel and per frame. When the compressed
rows of the rank's frames fit in half the memory budget they are kept, otherwise every iteration
streams them from the photon files block by block, so a rank's memory is bounded by the budget and
not by its share of the frames. Frames with no photon on a used pixel carry no information about
their class and would make every sum over their probabilities 0/0; they are left out (and
reported by the caller).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from spiscape.io.photons import PhotonDataset


@dataclass
class Block:
    """Frames ``[start, stop)`` of the rank's kept frames, in the engine's pixel order.

    ``parts[i]`` is the photon matrix of pixel chunk ``i`` (b × chunk): a dense float32 array
    (a column slice of ``dense``) or a CSR matrix; ``parts_t[i]`` its transpose (chunk × b), a view
    or a CSR matrix, for the M-step's ``K.T @ P``.
    """

    start: int
    stop: int
    parts: list
    parts_t: list
    photons: object  # (b,) photons on used pixels, on the device


@dataclass
class PixelChunk:
    """Engine pixels ``[start, stop)``, all dense or all sparse."""

    start: int
    stop: int
    dense: bool


def pixel_chunks(num_dense: int, num_pix: int, max_len: int) -> list[PixelChunk]:
    """Dense pixels [0, num_dense) then sparse ones, cut into chunks of at most ``max_len``."""
    chunks = []
    for lo, hi, dense in ((0, num_dense, True), (num_dense, num_pix, False)):
        for start in range(lo, hi, max(1, max_len)):
            chunks.append(PixelChunk(start, min(start + max_len, hi), dense))
    return chunks


def measure_crossover(csr: scipy.sparse.csr_matrix, num_views: int, xp=np, repeats: int = 3
                      ) -> float:
    """Photon density below which a pixel is cheaper as CSR than dense, on this machine.

    Times ``K @ L`` with K a sample of frames (b × P) as a dense block and as CSR, L random
    (P × min(num_views, 512)); the dense cost per pixel column is ``t_dense / P``, the sparse cost
    per photon ``t_sparse / nnz``, and a pixel with density ρ costs ``b ρ t_sparse / nnz`` sparse
    against ``t_dense / P`` dense. Best of ``repeats`` runs of each, rounded to a step of
    2^(1/2) so that two runs on one machine mostly split alike (a timing is never exact: pass a
    number as ``sparse_below`` for runs that repeat to the last bit).
    """
    if csr.nnz == 0:
        return 1.0
    views = max(16, min(num_views, 512))
    rng = np.random.default_rng(0)
    lw = xp.asarray(rng.standard_normal((csr.shape[1], views)).astype(np.float32))
    dense = xp.asarray(csr.toarray())
    sparse = _to_device_csr(csr, xp)

    def best(fn) -> float:
        times = []
        for _ in range(repeats + 1):  # the first run warms caches and kernels up
            _synchronize(xp)
            t0 = time.perf_counter()
            fn()
            _synchronize(xp)
            times.append(time.perf_counter() - t0)
        return max(min(times[1:]), 1e-9)

    t_dense = best(lambda: dense @ lw)
    t_sparse = best(lambda: sparse @ lw)
    per_pixel_dense = t_dense / csr.shape[1]
    per_photon_sparse = t_sparse / csr.nnz
    crossover = per_pixel_dense / (csr.shape[0] * per_photon_sparse)
    return float(2.0 ** (np.round(2 * np.log2(crossover)) / 2))


def _synchronize(xp) -> None:
    if xp is not np:
        xp.cuda.Device().synchronize()


def _to_device_csr(csr, xp):
    if xp is np:
        return csr
    import cupyx.scipy.sparse

    return cupyx.scipy.sparse.csr_matrix(csr)


class FrameStore:
    """The rank's frames, read in blocks in the engine's pixel order (see the module's notes).

    ``frames`` are the global frame numbers this rank owns (sorted); ``pixels`` the detector pixels
    merged into the model and ``used`` (bool, same length) those of them in the likelihood.
    Construction reads the frames once (:meth:`scan`); :meth:`arrange` then fixes the pixel order
    and the dense/sparse split, and :meth:`blocks` yields them every iteration.
    """

    def __init__(self, photon_files, frames: np.ndarray, num_pix: int, pixels: np.ndarray,
                 used: np.ndarray, block: int, xp=np):
        self.photon_files = photon_files
        self.num_pix = int(num_pix)
        self.pixels = np.asarray(pixels, dtype=np.int64)
        self.used = np.asarray(used, dtype=bool)
        self.block = max(1, int(block))
        self.xp = xp
        self._lock = threading.Lock()
        self._dataset = None
        self.frames = np.asarray(frames, dtype=np.int64)
        self.scan()

    # -- reading -----------------------------------------------------------------------------
    def _read_csr(self, frames: np.ndarray) -> scipy.sparse.csr_matrix:
        """Photon counts of ``frames`` on the merged pixels, columns in ``self.pixels`` order."""
        with self._lock:  # h5py and .emc file handles are shared by the worker threads
            if self._dataset is None:
                self._dataset = PhotonDataset(self.photon_files, self.num_pix)
            photons = self._dataset.read(frames)
        csr = photons.to_csr()
        remap = np.full(self.num_pix, -1, dtype=np.int64)
        remap[self.pixels] = np.arange(self.pixels.size)
        columns = remap[csr.indices]
        keep = columns >= 0
        rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))[keep]
        out = scipy.sparse.csr_matrix((csr.data[keep], (rows, columns[keep])),
                                      shape=(csr.shape[0], self.pixels.size), dtype=np.float32)
        out.sum_duplicates()
        return out

    def close(self) -> None:
        if self._dataset is not None:
            self._dataset.close()
            self._dataset = None

    def scan(self) -> None:
        """One pass over the frames: photons per frame on used pixels, frames with a photon per
        pixel, the powder pattern; frames without a photon on a used pixel are dropped."""
        n_pix = self.pixels.size
        self.pixel_frames = np.zeros(n_pix, dtype=np.float64)
        self.powder = np.zeros(n_pix, dtype=np.float64)
        photons = np.zeros(self.frames.size, dtype=np.float64)
        nnz = 0
        for start in range(0, self.frames.size, self.block):
            csr = self._read_csr(self.frames[start:start + self.block])
            photons[start:start + csr.shape[0]] = csr[:, self.used].sum(axis=1).A1
            self.pixel_frames += np.bincount(csr.indices, minlength=n_pix)
            self.powder += np.bincount(csr.indices, weights=csr.data, minlength=n_pix)
            nnz += csr.nnz
        empty = photons <= 0
        self.empty_frames = self.frames[empty]
        self.frames = self.frames[~empty]
        self.photons_used = photons[~empty]
        self.nnz = nnz
        self.order = None

    @property
    def num_frames(self) -> int:
        return int(self.frames.size)

    def sample(self, count: int) -> scipy.sparse.csr_matrix:
        """The first ``count`` kept frames (CSR, used pixels only) for :func:`measure_crossover`."""
        csr = self._read_csr(self.frames[:count])
        return csr[:, np.flatnonzero(self.used)].tocsr()

    # -- layout ------------------------------------------------------------------------------
    def arrange(self, order: np.ndarray, num_dense: int, chunks: list[PixelChunk],
                cache_bytes: int) -> None:
        """Fix the engine's pixel order (a permutation of ``self.pixels``' positions, the same on
        every rank), its first ``num_dense`` pixels dense, and keep the blocks in memory when
        they fit in ``cache_bytes``."""
        self.order = np.asarray(order, dtype=np.int64)
        self.num_dense = int(num_dense)
        self.chunks = chunks
        self.pixels = self.pixels[self.order]
        self.used = self.used[self.order]
        self.pixel_frames = self.pixel_frames[self.order]
        self.powder = self.powder[self.order]
        # what a block costs to keep: CSR of the sparse pixels (float32 + int32 index per photon),
        # its transpose, and the dense pixels as float32
        sparse_share = float(self.pixel_frames[self.num_dense:].sum()) / max(self.nnz, 1)
        kept = self.nnz * 16 * sparse_share + self.num_frames * self.num_dense * 4.0
        self.cached = kept <= cache_bytes
        self._cache = None
        if self.cached:
            self._cache = [self._make_block(start) for start in self.starts()]
            self.close()

    def starts(self) -> range:
        return range(0, self.num_frames, self.block)

    def _make_block(self, start: int) -> Block:
        xp = self.xp
        stop = min(start + self.block, self.num_frames)
        csr = self._read_csr(self.frames[start:stop])  # columns in the engine's order
        dense = None
        if self.num_dense:
            dense = xp.asarray(csr[:, : self.num_dense].toarray())
        parts, parts_t = [], []
        sparse_all = csr[:, self.num_dense :].tocsc() if self.num_dense < csr.shape[1] else None
        for chunk in self.chunks:
            if chunk.dense:
                part = dense[:, chunk.start : chunk.stop]
                parts.append(part)
                parts_t.append(part.T)
            else:
                lo, hi = chunk.start - self.num_dense, chunk.stop - self.num_dense
                piece = sparse_all[:, lo:hi]
                parts.append(_to_device_csr(piece.tocsr(), xp))
                parts_t.append(_to_device_csr(piece.T.tocsr(), xp))
        return Block(start, stop, parts, parts_t,
                     xp.asarray(self.photons_used[start:stop].astype(np.float32)))

    def block_at(self, start: int) -> Block:
        if self._cache is not None:
            return self._cache[start // self.block]
        return self._make_block(start)
