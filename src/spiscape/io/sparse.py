"""The sparse photon frames in memory (:class:`SparsePhotons`), the type every reader returns and
every writer takes, and the int32 array helpers the formats share.

A frame is stored sparsely: the indices of the pixels that caught exactly one photon
(``place_ones``), and the indices of those that caught more (``place_multi``) together with their
counts (``count_multi``, each >= 2). Pixel indices count from 0 in the detector file's pixel order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import h5py
import numpy as np

from spiscape.errors import InputError

VLEN_INT32 = h5py.vlen_dtype(np.int32)
INT32_MAX = np.iinfo(np.int32).max
ARRAY_FIELDS = ("ones", "multi", "place_ones", "place_multi", "count_multi")
HDF5_CHUNK_FRAMES = 4096
HDF5_WRITE_FRAMES = 65536


def as_int32(array, name: str) -> np.ndarray:
    """``array`` as a 1-D int32 array; ValueError when it does not hold int32 integers."""
    array = np.asarray(array)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.dtype == np.int32:
        return array
    if array.size == 0:
        return np.empty(0, dtype=np.int32)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array) & (array == np.rint(array))):
            raise ValueError(f"{name} holds non-integral values")
    elif array.dtype.kind not in "biu":
        raise ValueError(f"{name} has type {array.dtype}, not integers")
    if array.max() > INT32_MAX or array.min() < -INT32_MAX - 1:
        raise ValueError(f"{name} holds values outside the int32 range")
    return array.astype(np.int32)


def frame_offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def gather_positions(offsets: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lengths of the chosen frames and the flat positions of their entries, in frame order."""
    starts = offsets[frames]
    lengths = offsets[frames + 1] - starts
    new_starts = np.cumsum(lengths) - lengths
    positions = np.arange(int(lengths.sum()), dtype=np.int64)
    positions += np.repeat(starts - new_starts, lengths)
    return lengths, positions


def concat_arrays(arrays: Sequence[np.ndarray]) -> np.ndarray:
    arrays = list(arrays)
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int32)


@dataclass(eq=False)
class SparsePhotons:
    """Photon frames in Dragonfly's sparse layout, all frames' entries in flat int32 arrays.

    Frame ``i`` owns ``place_ones[ones_offsets[i]:ones_offsets[i + 1]]`` and the matching slices
    of ``place_multi``/``count_multi`` given by ``multi_offsets``. The offsets are cached: replace
    the object rather than changing ``ones``/``multi`` in place.
    """

    num_pix: int
    ones: np.ndarray
    multi: np.ndarray
    place_ones: np.ndarray
    place_multi: np.ndarray
    count_multi: np.ndarray

    def __post_init__(self):
        self.num_pix = int(self.num_pix)
        for name in ARRAY_FIELDS:
            setattr(self, name, as_int32(getattr(self, name), name))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls, num_pix: int) -> SparsePhotons:
        """A dataset with no frames."""
        return cls(num_pix, *([np.empty(0, dtype=np.int32)] * 5))

    @classmethod
    def from_dense(cls, frames) -> SparsePhotons:
        """Sparse frames from dense photon counts of shape ``(num_frames, num_pix)``.

        Counts must be non-negative integers (a float array is accepted when integral).
        """
        frames = np.asarray(frames)
        if frames.ndim != 2:
            raise ValueError(
                f"dense frames must have shape (num_frames, num_pix), got {frames.shape}"
            )
        if frames.dtype.kind not in "biuf":
            raise ValueError(f"dense frames have type {frames.dtype}, not photon counts")
        num_frames, num_pix = frames.shape
        # One pass over the dense data; every check then looks at the non-zero values only
        # (NaN and inf are non-zero too).
        where = np.flatnonzero(frames)
        counts = frames.reshape(-1)[where]
        if counts.dtype.kind == "f":
            if not np.all(np.isfinite(counts) & (counts == np.rint(counts))):
                raise ValueError("dense frames hold non-integral photon counts")
        if counts.dtype.kind in "if" and counts.size and counts.min() < 0:
            raise ValueError("dense frames hold negative photon counts")
        frame, pixel = np.divmod(where, num_pix)
        single = counts == 1
        multi = ~single
        return cls(
            num_pix,
            np.bincount(frame[single], minlength=num_frames),
            np.bincount(frame[multi], minlength=num_frames),
            pixel[single],
            pixel[multi],
            counts[multi],
        )

    @classmethod
    def from_frames(cls, num_pix: int, frames: Iterable[tuple]) -> SparsePhotons:
        """Sparse frames from ``(place_ones, place_multi, count_multi)`` per frame."""
        place_ones, place_multi, count_multi = [], [], []
        for i, (ones, multi, counts) in enumerate(frames):
            place_ones.append(np.asarray(ones, dtype=np.int64).ravel())
            place_multi.append(np.asarray(multi, dtype=np.int64).ravel())
            count_multi.append(np.asarray(counts, dtype=np.int64).ravel())
            if place_multi[-1].shape != count_multi[-1].shape:
                raise ValueError(f"frame {i}: place_multi and count_multi differ in length")
        return cls(
            num_pix,
            np.array([len(p) for p in place_ones], dtype=np.int64),
            np.array([len(p) for p in place_multi], dtype=np.int64),
            concat_arrays(place_ones),
            concat_arrays(place_multi),
            concat_arrays(count_multi),
        )

    @staticmethod
    def concatenate(items: Iterable[SparsePhotons]) -> SparsePhotons:
        """Frames of every item, in order; all must have the same ``num_pix``."""
        items = list(items)
        if not items:
            raise ValueError("nothing to concatenate")
        num_pix = items[0].num_pix
        for item in items[1:]:
            if item.num_pix != num_pix:
                raise ValueError(
                    f"cannot concatenate frames of {num_pix} and {item.num_pix} pixels"
                )
        if len(items) == 1:
            return items[0]
        return SparsePhotons(
            num_pix,
            *(concat_arrays([getattr(item, name) for item in items]) for name in ARRAY_FIELDS),
        )

    # -- shape and access ---------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        return int(self.ones.shape[0])

    def __len__(self) -> int:
        return self.num_frames

    @cached_property
    def ones_offsets(self) -> np.ndarray:
        """int64 ``(num_frames + 1,)``: where each frame's ``place_ones`` start."""
        return frame_offsets(self.ones)

    @cached_property
    def multi_offsets(self) -> np.ndarray:
        """int64 ``(num_frames + 1,)``: where each frame's ``place_multi``/``count_multi`` start."""
        return frame_offsets(self.multi)

    def frame(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(place_ones, place_multi, count_multi)`` of frame ``i`` (views)."""
        n = self.num_frames
        if not -n <= i < n:
            raise IndexError(f"frame {i} out of range for {n} frames")
        i %= n
        a, b = self.ones_offsets[i], self.ones_offsets[i + 1]
        c, d = self.multi_offsets[i], self.multi_offsets[i + 1]
        return self.place_ones[a:b], self.place_multi[c:d], self.count_multi[c:d]

    def equals(self, other: SparsePhotons) -> bool:
        """True when both hold the same frames with the same entries in the same order."""
        return self.num_pix == other.num_pix and all(
            np.array_equal(getattr(self, name), getattr(other, name)) for name in ARRAY_FIELDS
        )

    def select(self, indices) -> SparsePhotons:
        """The frames at ``indices`` (slice, integer array or boolean mask), in that order."""
        frames = np.arange(self.num_frames)[indices]
        frames = np.atleast_1d(frames).astype(np.int64)
        contiguous = frames.size and frames[-1] - frames[0] == frames.size - 1
        if contiguous and np.all(np.diff(frames) == 1):
            a, b = frames[0], frames[-1] + 1
            o0, o1 = self.ones_offsets[a], self.ones_offsets[b]
            m0, m1 = self.multi_offsets[a], self.multi_offsets[b]
            return SparsePhotons(
                self.num_pix,
                self.ones[a:b],
                self.multi[a:b],
                self.place_ones[o0:o1],
                self.place_multi[m0:m1],
                self.count_multi[m0:m1],
            )
        ones, ones_at = gather_positions(self.ones_offsets, frames)
        multi, multi_at = gather_positions(self.multi_offsets, frames)
        return SparsePhotons(
            self.num_pix,
            ones,
            multi,
            self.place_ones[ones_at],
            self.place_multi[multi_at],
            self.count_multi[multi_at],
        )

    # -- derived quantities -------------------------------------------------------------------
    def photons_per_frame(self) -> np.ndarray:
        """int64 ``(num_frames,)``: the number of photons in each frame."""
        summed = frame_offsets(self.count_multi)
        offsets = self.multi_offsets
        return self.ones.astype(np.int64) + summed[offsets[1:]] - summed[offsets[:-1]]

    def powder(self) -> np.ndarray:
        """float64 ``(num_pix,)``: photons summed over all frames (the virtual powder pattern)."""
        total = np.bincount(self.place_ones, minlength=self.num_pix).astype(np.float64)
        total += np.bincount(self.place_multi, weights=self.count_multi, minlength=self.num_pix)
        return total

    def to_dense(self, frames=None) -> np.ndarray:
        """int32 ``(n, num_pix)`` photon counts of all frames, or of ``frames`` (see select)."""
        chosen = self if frames is None else self.select(frames)
        n = chosen.num_frames
        dense = np.zeros((n, self.num_pix), dtype=np.int32)
        rows = np.repeat(np.arange(n), chosen.ones)
        np.add.at(dense, (rows, chosen.place_ones), 1)
        rows = np.repeat(np.arange(n), chosen.multi)
        np.add.at(dense, (rows, chosen.place_multi), chosen.count_multi)
        return dense

    def to_csr(self, dtype=np.float32):
        """``scipy.sparse.csr_matrix`` ``(num_frames, num_pix)`` of photon counts.

        Repeated pixel indices within a frame are summed; column indices are sorted.
        """
        import scipy.sparse

        nnz = self.place_ones.size + self.place_multi.size
        index_dtype = np.int32 if nnz < INT32_MAX else np.int64
        indptr = (self.ones_offsets + self.multi_offsets).astype(index_dtype)
        # Row i holds its single-photon pixels, then its multi-photon pixels.
        ones_to = np.arange(self.place_ones.size, dtype=np.int64)
        ones_to += np.repeat(self.multi_offsets[:-1], self.ones)
        multi_to = np.arange(self.place_multi.size, dtype=np.int64)
        multi_to += np.repeat(self.ones_offsets[1:], self.multi)
        indices = np.empty(nnz, dtype=index_dtype)
        data = np.empty(nnz, dtype=dtype)
        indices[ones_to] = self.place_ones
        data[ones_to] = 1
        indices[multi_to] = self.place_multi
        data[multi_to] = self.count_multi
        matrix = scipy.sparse.csr_matrix(
            (data, indices, indptr), shape=(self.num_frames, self.num_pix)
        )
        matrix.sum_duplicates()
        return matrix

    # -- checks -------------------------------------------------------------------------------
    def validate(
        self, path: str | os.PathLike | None = None, *, first_frame: int | np.ndarray = 0
    ) -> None:
        """Raise :class:`InputError` (naming ``path``) unless the frames are consistent.

        Checks non-negative lengths, that the flat arrays match ``ones``/``multi``, pixel indices
        in ``[0, num_pix)`` and multi-photon counts >= 2. Messages number the frames from
        ``first_frame`` (their position in the file), or by the array ``first_frame`` of their
        numbers in the file.
        """

        def fail(problem: str):
            raise InputError(path, problem)

        def number(i: int) -> int:
            if isinstance(first_frame, np.ndarray):
                return int(first_frame[i])
            return i + first_frame

        def first_bad(bad: np.ndarray, offsets: np.ndarray) -> tuple[int, int]:
            k = int(np.argmax(bad))
            return k, number(int(np.searchsorted(offsets, k, side="right")) - 1)

        if self.num_pix <= 0:
            fail(f"num_pix is {self.num_pix}; it must be positive")
        if self.ones.shape != self.multi.shape:
            fail(f"'ones' has {self.ones.size} frames but 'multi' has {self.multi.size}")
        for name in ("ones", "multi"):
            lengths = getattr(self, name)
            if lengths.size and lengths.min() < 0:
                i = int(np.argmin(lengths))
                fail(f"frame {number(i)}: negative photon count {lengths[i]} in '{name}'")
        expected = {"place_ones": int(self.ones.sum(dtype=np.int64))}
        expected["place_multi"] = expected["count_multi"] = int(self.multi.sum(dtype=np.int64))
        for name, total in expected.items():
            size = getattr(self, name).size
            if size != total:
                table = "ones" if name == "place_ones" else "multi"
                fail(f"'{table}' adds up to {total} entries but {name} holds {size}")
        checks = (("place_ones", self.ones_offsets), ("place_multi", self.multi_offsets))
        for name, offsets in checks:
            pixels = getattr(self, name)
            bad = (pixels < 0) | (pixels >= self.num_pix)
            if bad.any():
                k, frame = first_bad(bad, offsets)
                fail(
                    f"frame {frame}: pixel index {pixels[k]} in {name} is outside "
                    f"[0, {self.num_pix}) (num_pix)"
                )
        bad = self.count_multi < 2
        if bad.any():
            k, frame = first_bad(bad, self.multi_offsets)
            value = self.count_multi[k]
            if value < 0:
                fail(f"frame {frame}: negative photon count {value} in count_multi")
            fail(f"frame {frame}: count_multi holds {value}; multi-photon counts must be >= 2")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


