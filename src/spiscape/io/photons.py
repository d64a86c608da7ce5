"""Sparse photon frames in Dragonfly's formats: HDF5 and the binary ``.emc``.

Format
------
A frame is stored sparsely: the indices of the pixels that caught exactly one photon
(``place_ones``), and the indices of those that caught more (``place_multi``) together with their
counts (``count_multi``, each >= 2). Pixel indices count from 0 in the detector file's pixel order.

HDF5 (``.h5``/``.hdf5``; recognised on read by the HDF5 signature)
    ``num_pix``       int32, shape ``(1,)`` (shape ``()`` accepted on read)
    ``place_ones``    variable-length int32 (``h5py.vlen_dtype(np.int32)``), shape ``(num_frames,)``
    ``place_multi``   variable-length int32, shape ``(num_frames,)``
    ``count_multi``   variable-length int32, shape ``(num_frames,)``; same lengths as place_multi
    ``ones``, ``multi`` int32, shape ``(num_frames,)``: the per-frame lengths of ``place_ones``
                      and ``place_multi``. Always written; optional on read, checked when present.

Binary ``.emc`` (any file that is not HDF5), all int32 little endian
    header     1024 bytes = 256 int32: ``[0] = num_data`` (frames), ``[1] = num_pix``, rest 0
    ``ones``   num_data values, then ``multi``, num_data values
    then every frame's ``place_ones`` concatenated, then every ``place_multi``, then every
    ``count_multi``. The file size is therefore exactly
    ``1024 + 8 num_data + 4 (sum(ones) + 2 sum(multi))`` bytes; anything else is an error.

Datasets
    A dataset is one file, a list of files, or a text file (``.txt``/``.lst``) listing one photon
    file per line (``#`` starts a comment; relative paths are relative to the list file's folder).
    Every file must have the same ``num_pix``; frames are numbered across the files in list order.
    Dense CXI files (:mod:`spiscape.io.cxi`) may appear in a dataset too; they are converted to
    sparse frames as they are read.

Everything that reads files raises :class:`spiscape.errors.InputError` for bad input: the file
and one line saying what is wrong.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.utils.atomic import atomic_path

EMC_HEADER_BYTES = 1024
HDF5_SUFFIXES = (".h5", ".hdf5")
LIST_SUFFIXES = (".txt", ".lst")
_VLEN_INT32 = h5py.vlen_dtype(np.int32)
_INT32_MAX = np.iinfo(np.int32).max
_ARRAY_FIELDS = ("ones", "multi", "place_ones", "place_multi", "count_multi")
_HDF5_CHUNK_FRAMES = 4096
_HDF5_WRITE_FRAMES = 65536


def _as_int32(array, name: str) -> np.ndarray:
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
    if array.max() > _INT32_MAX or array.min() < -_INT32_MAX - 1:
        raise ValueError(f"{name} holds values outside the int32 range")
    return array.astype(np.int32)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _gather_positions(offsets: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lengths of the chosen frames and the flat positions of their entries, in frame order."""
    starts = offsets[frames]
    lengths = offsets[frames + 1] - starts
    new_starts = np.cumsum(lengths) - lengths
    positions = np.arange(int(lengths.sum()), dtype=np.int64)
    positions += np.repeat(starts - new_starts, lengths)
    return lengths, positions


def _concat(arrays: Sequence[np.ndarray]) -> np.ndarray:
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
        for name in _ARRAY_FIELDS:
            setattr(self, name, _as_int32(getattr(self, name), name))

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
            _concat(place_ones),
            _concat(place_multi),
            _concat(count_multi),
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
            num_pix, *(_concat([getattr(item, name) for item in items]) for name in _ARRAY_FIELDS)
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
        return _offsets(self.ones)

    @cached_property
    def multi_offsets(self) -> np.ndarray:
        """int64 ``(num_frames + 1,)``: where each frame's ``place_multi``/``count_multi`` start."""
        return _offsets(self.multi)

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
            np.array_equal(getattr(self, name), getattr(other, name)) for name in _ARRAY_FIELDS
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
        ones, ones_at = _gather_positions(self.ones_offsets, frames)
        multi, multi_at = _gather_positions(self.multi_offsets, frames)
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
        summed = _offsets(self.count_multi)
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
        index_dtype = np.int32 if nnz < _INT32_MAX else np.int64
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__


@contextlib.contextmanager
def _reading(path: Path):
    """Turn low-level failures while reading ``path`` into InputError."""
    try:
        yield
    except InputError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
        raise InputError(path, f"unreadable ({_first_line(exc)})") from exc


def _split_runs(frames: np.ndarray, max_gap: int, max_span: int) -> list[np.ndarray]:
    """Split sorted frame numbers into groups covering at most ``max_span`` frames each,
    breaking wherever two neighbours are more than ``max_gap`` apart."""
    groups = np.split(frames, np.flatnonzero(np.diff(frames) > max_gap) + 1)
    out = []
    for group in groups:
        while group.size and group[-1] - group[0] >= max_span:
            cut = int(np.searchsorted(group, group[0] + max_span))
            out.append(group[:cut])
            group = group[cut:]
        if group.size:
            out.append(group)
    return out


class _Source:
    """One photon file: its header, and reads of frame ranges or sorted frame sets."""

    path: Path
    num_frames: int
    num_pix: int
    #: frames fetched per HDF5 call when reading a frame set
    block_frames = 65536

    def read_range(self, start: int, stop: int) -> SparsePhotons:
        raise NotImplementedError

    def read_frames(self, frames: np.ndarray) -> SparsePhotons:
        """Frames at sorted, unique ``frames`` (HDF5 point selections of up to block_frames)."""
        if frames.size == 0:
            return SparsePhotons.empty(self.num_pix)
        if frames[-1] - frames[0] == frames.size - 1:
            return self.read_range(int(frames[0]), int(frames[-1]) + 1)
        parts = [
            self._read_selection(frames[a:a + self.block_frames])
            for a in range(0, frames.size, self.block_frames)
        ]
        return SparsePhotons.concatenate(parts)

    def _read_selection(self, frames: np.ndarray) -> SparsePhotons:
        raise NotImplementedError

    def close(self) -> None:
        pass


#: what a file that is neither HDF5 nor a Dragonfly .emc is told
NOT_PHOTONS = ("not a photon file: neither HDF5 nor a Dragonfly .emc (a 1024-byte header of "
               "two counts and zeros)")


class _EmcSource(_Source):
    """A binary ``.emc`` file, read with offsets into the file."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        if size == 0:
            raise InputError(path, "empty file")
        if size < EMC_HEADER_BYTES:
            if path.suffix.lower() != ".emc":
                raise InputError(path, NOT_PHOTONS)
            raise InputError(
                path, f"truncated: {size} bytes, shorter than the {EMC_HEADER_BYTES}-byte header"
            )
        header = np.fromfile(path, dtype="<i4", count=EMC_HEADER_BYTES // 4)
        if np.any(header[2:]):
            raise InputError(path, NOT_PHOTONS)
        self.num_frames, self.num_pix = int(header[0]), int(header[1])
        if self.num_frames < 0 or self.num_pix <= 0:
            raise InputError(
                path,
                f"not a sparse photon file: header says {self.num_frames} frames of "
                f"{self.num_pix} pixels",
            )
        minimum = EMC_HEADER_BYTES + 8 * self.num_frames
        if size < minimum:
            raise InputError(
                path,
                f"truncated: header says {self.num_frames} frames but the file ends inside the "
                f"per-frame counts ({size} bytes, need at least {minimum})",
            )
        self.size = size
        self._tables: tuple[np.ndarray, ...] | None = None

    def _load_tables(self) -> tuple[np.ndarray, ...]:
        """Per-frame counts, their offsets, and where each section starts; checks the file size."""
        if self._tables is not None:
            return self._tables
        n = self.num_frames
        counts = self._read_ints(EMC_HEADER_BYTES, 2 * n)
        ones, multi = counts[:n], counts[n:]
        for name, lengths in (("ones", ones), ("multi", multi)):
            if lengths.size and lengths.min() < 0:
                i = int(np.argmin(lengths))
                raise InputError(
                    self.path, f"frame {i}: negative photon count {lengths[i]} in '{name}'"
                )
        ones_offsets, multi_offsets = _offsets(ones), _offsets(multi)
        total_ones, total_multi = int(ones_offsets[-1]), int(multi_offsets[-1])
        place_ones_at = EMC_HEADER_BYTES + 8 * n
        place_multi_at = place_ones_at + 4 * total_ones
        count_multi_at = place_multi_at + 4 * total_multi
        expected = count_multi_at + 4 * total_multi
        if self.size < expected:
            raise InputError(
                self.path,
                f"truncated: header says {n} frames needing {expected} bytes but the file has "
                f"{self.size}",
            )
        if self.size > expected:
            raise InputError(
                self.path,
                f"{self.size - expected} trailing bytes after the {n} frames the header announces",
            )
        self._tables = (ones, multi, ones_offsets, multi_offsets,
                        place_ones_at, place_multi_at, count_multi_at)
        return self._tables

    def _read_ints(self, offset: int, count: int) -> np.ndarray:
        with _reading(self.path):
            values = np.fromfile(self.path, dtype="<i4", count=count, offset=offset)
        if values.size != count:
            raise InputError(self.path, f"truncated: ends before byte {offset + 4 * count}")
        return values.astype(np.int32, copy=False)

    def read_range(self, start: int, stop: int) -> SparsePhotons:
        ones, multi, o_off, m_off, po_at, pm_at, cm_at = self._load_tables()
        o0, o1 = int(o_off[start]), int(o_off[stop])
        m0, m1 = int(m_off[start]), int(m_off[stop])
        photons = SparsePhotons(
            self.num_pix,
            ones[start:stop],
            multi[start:stop],
            self._read_ints(po_at + 4 * o0, o1 - o0),
            self._read_ints(pm_at + 4 * m0, m1 - m0),
            self._read_ints(cm_at + 4 * m0, m1 - m0),
        )
        photons.validate(self.path, first_frame=start)
        return photons

    def read_frames(self, frames: np.ndarray) -> SparsePhotons:
        if frames.size == 0 or frames[-1] - frames[0] == frames.size - 1:
            return super().read_frames(frames)
        ones, multi, o_off, m_off, po_at, pm_at, cm_at = self._load_tables()
        ones_sel, ones_pos = _gather_positions(o_off, frames)
        multi_sel, multi_pos = _gather_positions(m_off, frames)
        # A memory map reads only the pages that hold the chosen frames.
        with _reading(self.path):
            words = np.memmap(self.path, dtype="<i4", mode="r", shape=(self.size // 4,))
        try:
            photons = SparsePhotons(
                self.num_pix,
                ones_sel,
                multi_sel,
                words[po_at // 4 + ones_pos],
                words[pm_at // 4 + multi_pos],
                words[cm_at // 4 + multi_pos],
            )
        finally:
            del words
        photons.validate(self.path, first_frame=frames)
        return photons


class _HDF5Source(_Source):
    """A Dragonfly HDF5 photon file, kept open while the dataset is read."""

    def __init__(self, path: Path, f: h5py.File):
        self.path = path
        self.file = f
        self.datasets = {}
        for name in ("num_pix", "place_ones", "place_multi", "count_multi"):
            dset = f.get(name)
            if not isinstance(dset, h5py.Dataset):
                raise InputError(path, f"missing dataset '{name}'")
            self.datasets[name] = dset
        num_pix = self.datasets.pop("num_pix")
        if num_pix.size != 1 or num_pix.ndim > 1 or num_pix.dtype.kind not in "iu":
            raise InputError(
                path, f"'num_pix' must be one integer, got {num_pix.dtype} {num_pix.shape}"
            )
        self.num_pix = int(np.asarray(num_pix[()]).reshape(()))
        if self.num_pix <= 0:
            raise InputError(path, f"num_pix is {self.num_pix}; it must be positive")
        for name, dset in self.datasets.items():
            base = h5py.check_vlen_dtype(dset.dtype)
            if dset.ndim != 1 or base is None or np.dtype(base).kind not in "iu":
                raise InputError(
                    path, f"'{name}' is not a 1-D variable-length integer dataset ({dset.dtype})"
                )
        self.num_frames = int(self.datasets["place_ones"].shape[0])
        for name in ("place_multi", "count_multi"):
            length = self.datasets[name].shape[0]
            if length != self.num_frames:
                raise InputError(
                    path, f"'{name}' has {length} frames but 'place_ones' has {self.num_frames}"
                )
        self.tables = {}
        for name in ("ones", "multi"):
            if name not in f:
                continue
            dset = f[name]
            if not isinstance(dset, h5py.Dataset) or dset.dtype.kind not in "iu":
                raise InputError(path, f"'{name}' is not an integer dataset")
            if dset.shape != (self.num_frames,):
                raise InputError(
                    path,
                    f"'{name}' has shape {dset.shape} but the file has {self.num_frames} frames",
                )
            self.tables[name] = dset[()]

    def _flatten(self, name: str, selection) -> tuple[np.ndarray, np.ndarray]:
        """Per-frame lengths and concatenated entries of a vlen dataset at ``selection``."""
        rows = self.datasets[name][selection]
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        flat = np.concatenate(rows) if len(rows) else np.empty(0, dtype=np.int32)
        return lengths, flat

    def read_range(self, start: int, stop: int) -> SparsePhotons:
        return self._read(slice(start, stop), np.arange(start, stop))

    def _read_selection(self, frames: np.ndarray) -> SparsePhotons:
        return self._read(frames, frames)

    def _read(self, selection, numbers: np.ndarray) -> SparsePhotons:
        """Frames at ``selection`` (a slice or sorted frame numbers ``numbers``), checked."""
        with _reading(self.path):
            ones, place_ones = self._flatten("place_ones", selection)
            multi, place_multi = self._flatten("place_multi", selection)
            counts, count_multi = self._flatten("count_multi", selection)
        self._check_lengths("place_multi", multi, "count_multi", counts, numbers)
        for name, lengths, flat in (("ones", ones, "place_ones"), ("multi", multi, "place_multi")):
            if name in self.tables:
                table = self.tables[name][selection]
                self._check_lengths(flat, lengths, f"'{name}'", table, numbers)
        with _reading(self.path):
            photons = SparsePhotons(
                self.num_pix, ones, multi, place_ones, place_multi, count_multi
            )
        photons.validate(self.path, first_frame=numbers)
        return photons

    def _check_lengths(self, name_a, lengths_a, name_b, lengths_b, numbers) -> None:
        differ = lengths_a != lengths_b
        if differ.any():
            i = int(np.argmax(differ))
            raise InputError(
                self.path,
                f"frame {numbers[i]}: {name_a} holds {lengths_a[i]} entries but {name_b} "
                f"says {lengths_b[i]}",
            )

    def close(self) -> None:
        self.file.close()


def _open_source(path: Path) -> _Source:
    """The reader for one photon file, chosen by content: HDF5 sparse, HDF5 CXI, or ``.emc``."""
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a directory, not a photon file")
    with _reading(path):
        if not h5py.is_hdf5(path):
            return _EmcSource(path)
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise InputError(path, f"unreadable HDF5 file ({_first_line(exc)})") from exc
    try:
        with _reading(path):
            if any(key in f for key in ("num_pix", "place_ones", "place_multi", "count_multi")):
                return _HDF5Source(path, f)
            from spiscape.io.cxi import CXI_DATA, CxiSource

            if CXI_DATA in f:
                return CxiSource(path, f)
            raise InputError(
                path,
                f"missing dataset 'place_ones': neither sparse photons nor CXI frames ({CXI_DATA})",
            )
    except BaseException:
        f.close()
        raise


def photon_files(spec) -> list[Path]:
    """The photon files of a dataset: a path, a list of paths, or a ``.txt``/``.lst`` list file.

    A list file names one file per line; ``#`` starts a comment, blank lines are skipped and
    relative paths are taken relative to the list file's folder. Missing files raise InputError.
    """
    items = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    if not items:
        raise InputError(None, "no photon files given")
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.suffix.lower() not in LIST_SUFFIXES:
            if not path.exists():
                raise InputError(path, "no such file")
            files.append(path)
            continue
        files.extend(_read_list_file(path))
    return files


def _read_list_file(path: Path) -> list[Path]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"unreadable list of photon files ({_first_line(exc)})") from exc
    files = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        listed = Path(entry)
        if not listed.is_absolute():
            listed = path.parent / listed
        if listed.suffix.lower() in LIST_SUFFIXES:
            raise InputError(path, f"line {number}: lists another list file ({entry})")
        if not listed.exists():
            raise InputError(listed, f"no such file (listed in {path.name} line {number})")
        files.append(listed)
    if not files:
        raise InputError(path, "lists no photon files")
    return files


class _Dataset:
    """The files of a dataset, opened (headers checked) and numbered as one frame sequence."""

    def __init__(self, spec, num_pix: int | None = None):
        self.files = photon_files(spec)
        single = isinstance(spec, str | os.PathLike)
        self.label = Path(spec) if single else self.files[0]
        self.sources: list[_Source] = []
        try:
            for path in self.files:
                self.sources.append(_open_source(path))
            first = self.sources[0]
            for source in self.sources[1:]:
                if source.num_pix != first.num_pix:
                    raise InputError(
                        source.path,
                        f"num_pix {source.num_pix} differs from {first.num_pix} in "
                        f"{first.path.name}; all files of a dataset need the same detector",
                    )
            if num_pix is not None and first.num_pix != num_pix:
                raise InputError(
                    first.path,
                    f"num_pix {first.num_pix} does not match the detector's {num_pix} pixels",
                )
        except BaseException:
            self.close()
            raise
        self.num_pix = first.num_pix
        self.starts = _offsets(np.array([s.num_frames for s in self.sources], dtype=np.int64))
        self.num_frames = int(self.starts[-1])

    def __enter__(self) -> _Dataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for source in self.sources:
            source.close()

    def read_range(self, start: int, stop: int) -> SparsePhotons:
        parts = []
        for k, source in enumerate(self.sources):
            first, last = int(self.starts[k]), int(self.starts[k + 1])
            a, b = max(start, first), min(stop, last)
            if a < b:
                parts.append(source.read_range(a - first, b - first))
        return SparsePhotons.concatenate(parts) if parts else SparsePhotons.empty(self.num_pix)

    def read(self, frames=None) -> SparsePhotons:
        total = self.num_frames
        if frames is None:
            return self.read_range(0, total)
        if isinstance(frames, slice):
            start, stop, step = frames.indices(total)
            if step == 1:
                return self.read_range(start, max(start, stop))
            wanted = np.arange(start, stop, step, dtype=np.int64)
        else:
            wanted = np.asarray(frames)
            if wanted.dtype == bool:
                if wanted.shape != (total,):
                    raise InputError(
                        self.label,
                        f"frame mask has {wanted.size} entries but the dataset has {total} frames",
                    )
                wanted = np.flatnonzero(wanted)
            elif wanted.size == 0:
                wanted = np.empty(0, dtype=np.int64)
            elif wanted.dtype.kind not in "iu":
                raise TypeError(
                    f"frames must be a slice, integers or a boolean mask, not {wanted.dtype}"
                )
            wanted = wanted.astype(np.int64).ravel()
            outside = (wanted < 0) | (wanted >= total)
            if outside.any():
                raise InputError(
                    self.label,
                    f"frame index {wanted[np.argmax(outside)]} is out of range: the dataset has "
                    f"{total} frames",
                )
        unique, inverse = np.unique(wanted, return_inverse=True)
        owner = np.searchsorted(self.starts, unique, side="right") - 1
        parts = []
        for k, source in enumerate(self.sources):
            mine = unique[owner == k]
            if mine.size:
                parts.append(source.read_frames(mine - self.starts[k]))
        photons = SparsePhotons.concatenate(parts) if parts else SparsePhotons.empty(self.num_pix)
        if unique.size != wanted.size or not np.array_equal(unique, wanted):
            photons = photons.select(inverse.ravel())
        return photons


def photon_header(spec, num_pix: int | None = None) -> tuple[int, int]:
    """``(num_frames, num_pix)`` of a dataset, from the file headers only."""
    with _Dataset(spec, num_pix) as dataset:
        return dataset.num_frames, dataset.num_pix


def count_frames(spec) -> int:
    """Number of frames in a dataset, from the file headers only."""
    return photon_header(spec)[0]


def read_photons(spec, frames=None, num_pix: int | None = None) -> SparsePhotons:
    """Read a dataset, or only ``frames`` of it (a slice, frame numbers or a boolean mask).

    Frame numbers run across the files of the dataset in order; the result holds the frames in
    the order asked for. Only the requested frames are read from disk. ``num_pix``, when given,
    must equal the files' ``num_pix`` (pass the detector's).
    """
    with _Dataset(spec, num_pix) as dataset:
        return dataset.read(frames)


def shard_bounds(num_frames: int, rank: int, size: int) -> tuple[int, int]:
    """``(start, stop)`` of the contiguous block of frames owned by ``rank`` of ``size``.

    Blocks differ in length by at most one frame; the first ``num_frames % size`` ranks get the
    longer ones.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a communicator of size {size}")
    base, extra = divmod(int(num_frames), size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def read_shard(spec, rank: int, size: int, num_pix: int | None = None) -> tuple[SparsePhotons, int]:
    """The frames of MPI rank ``rank`` out of ``size`` and the global number of its first frame.

    Each rank reads only its own block (see :func:`shard_bounds`).
    """
    with _Dataset(spec, num_pix) as dataset:
        start, stop = shard_bounds(dataset.num_frames, rank, size)
        return dataset.read_range(start, stop), start


def iter_chunks(
    spec, chunk_frames: int, num_pix: int | None = None
) -> Iterator[tuple[int, SparsePhotons]]:
    """Stream a dataset as ``(start, photons)`` blocks of at most ``chunk_frames`` frames."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be positive, got {chunk_frames}")
    with _Dataset(spec, num_pix) as dataset:
        for start in range(0, dataset.num_frames, chunk_frames):
            yield start, dataset.read_range(start, min(start + chunk_frames, dataset.num_frames))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def output_format(path: Path) -> str:
    """"hdf5" or "emc", from the suffix of an output photon file; InputError otherwise."""
    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        return "hdf5"
    if suffix == ".emc":
        return "emc"
    raise InputError(path, f"unknown photon file type '{suffix}'; use .h5, .hdf5 or .emc")


def _emc_header(num_frames: int, num_pix: int) -> np.ndarray:
    header = np.zeros(EMC_HEADER_BYTES // 4, dtype="<i4")
    header[0], header[1] = num_frames, num_pix
    return header


def _vlen_rows(flat: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """An object array of per-frame views, as h5py writes variable-length data."""
    rows = np.empty(offsets.size - 1, dtype=_VLEN_INT32)
    for i in range(rows.size):
        rows[i] = flat[offsets[i]:offsets[i + 1]]
    return rows


class PhotonWriter:
    """Write a photon file block by block; it appears under its name only when complete.

    ``with PhotonWriter("data.h5", num_pix) as out: out.append(photons)`` -- the format follows
    the suffix (``.h5``/``.hdf5`` or ``.emc``). For ``.emc`` the photon entries are spooled to
    temporary files beside the output until the frame count is known.
    """

    def __init__(self, path: str | os.PathLike, num_pix: int):
        self.path = Path(path)
        self.kind = output_format(self.path)
        self.num_pix = int(num_pix)
        self.num_frames = 0
        self._atomic = None

    def __enter__(self) -> PhotonWriter:
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        try:
            if self.kind == "hdf5":
                self._open_hdf5()
            else:
                self._lengths: list[tuple[np.ndarray, np.ndarray]] = []
                self._spools = [tempfile.TemporaryFile(dir=self.path.parent) for _ in range(3)]
        except BaseException as exc:
            self._atomic.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _open_hdf5(self) -> None:
        self._h5 = h5py.File(self._tmp, "w")
        self._h5.create_dataset("num_pix", data=np.array([self.num_pix], dtype=np.int32))
        for name in ("place_ones", "place_multi", "count_multi"):
            self._h5.create_dataset(
                name, shape=(0,), maxshape=(None,), dtype=_VLEN_INT32,
                chunks=(_HDF5_CHUNK_FRAMES,),
            )
        for name in ("ones", "multi"):
            self._h5.create_dataset(
                name, shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(_HDF5_CHUNK_FRAMES,)
            )

    def append(self, photons: SparsePhotons) -> None:
        """Add the frames of ``photons`` after those already written."""
        if photons.num_pix != self.num_pix:
            raise ValueError(
                f"frames of {photons.num_pix} pixels appended to a file of {self.num_pix}"
            )
        if self.kind == "hdf5":
            self._append_hdf5(photons)
        else:
            self._lengths.append((photons.ones, photons.multi))
            for spool, name in zip(self._spools, ("place_ones", "place_multi", "count_multi"),
                                   strict=True):
                getattr(photons, name).astype("<i4", copy=False).tofile(spool)
        self.num_frames += photons.num_frames

    def _append_hdf5(self, photons: SparsePhotons) -> None:
        n0, n = self.num_frames, photons.num_frames
        for name in ("ones", "multi", "place_ones", "place_multi", "count_multi"):
            self._h5[name].resize((n0 + n,))
        self._h5["ones"][n0:] = photons.ones
        self._h5["multi"][n0:] = photons.multi
        for a in range(0, n, _HDF5_WRITE_FRAMES):
            block = photons.select(slice(a, min(a + _HDF5_WRITE_FRAMES, n)))
            # write_direct: Dataset.__setitem__ mistakes rows of equal length for a 2-D array
            rows = np.s_[n0 + a:n0 + a + block.num_frames]
            self._h5["place_ones"].write_direct(
                _vlen_rows(block.place_ones, block.ones_offsets), dest_sel=rows
            )
            for name in ("place_multi", "count_multi"):
                self._h5[name].write_direct(
                    _vlen_rows(getattr(block, name), block.multi_offsets), dest_sel=rows
                )

    def _finish(self) -> None:
        if self.kind == "hdf5":
            self._h5.close()
            return
        ones = _concat([lengths[0] for lengths in self._lengths])
        multi = _concat([lengths[1] for lengths in self._lengths])
        with open(self._tmp, "wb") as f:
            _emc_header(self.num_frames, self.num_pix).tofile(f)
            ones.astype("<i4", copy=False).tofile(f)
            multi.astype("<i4", copy=False).tofile(f)
            for spool in self._spools:
                spool.seek(0)
                shutil.copyfileobj(spool, f, 16 << 20)
        self._abort()

    def _abort(self) -> None:
        if self.kind == "hdf5":
            if self._h5.id.valid:
                self._h5.close()
        else:
            for spool in self._spools:
                spool.close()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self._finish()
            except BaseException as err:
                self._abort()
                self._atomic.__exit__(type(err), err, err.__traceback__)
                raise
            self._atomic.__exit__(None, None, None)
        else:
            self._abort()
            self._atomic.__exit__(exc_type, exc, tb)
        return False


def write_photons(photons: SparsePhotons, path: str | os.PathLike) -> None:
    """Write ``photons`` atomically: HDF5 for ``.h5``/``.hdf5``, binary for ``.emc``."""
    path = Path(path)
    if output_format(path) == "hdf5":
        with PhotonWriter(path, photons.num_pix) as out:
            out.append(photons)
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        _emc_header(photons.num_frames, photons.num_pix).tofile(f)
        for name in _ARRAY_FIELDS:
            getattr(photons, name).astype("<i4", copy=False).tofile(f)
