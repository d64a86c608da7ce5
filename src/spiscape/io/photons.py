"""Photon datasets: one file, a list of files, or a list file, read as one frame sequence in any
of the formats (:mod:`.hdf5photons`, :mod:`.emcfile`, dense CXI :mod:`.cxi`), chosen by content.

A dataset is one file, a list of files, or a text file (``.txt``/``.lst``) listing one photon
file per line (``#`` starts a comment; relative paths are relative to the list file's folder).
Every file must have the same ``num_pix``; frames are numbered across the files in list order.
Dense CXI files may appear in a dataset too; they are converted to sparse frames as they are read.

Everything that reads files raises :class:`spiscape.errors.InputError` for bad input: the file
and one line saying what is wrong. Writing is :mod:`.photon_writer`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.io.cxi import CXI_DATA, CxiSource
from spiscape.io.emcfile import EmcSource
from spiscape.io.hdf5photons import HDF5Source
from spiscape.io.sources import PhotonSource, first_line, reading
from spiscape.io.sparse import SparsePhotons, frame_offsets

HDF5_SUFFIXES = (".h5", ".hdf5")
LIST_SUFFIXES = (".txt", ".lst")


def open_source(path: Path) -> PhotonSource:
    """The reader for one photon file, chosen by content: HDF5 sparse, HDF5 CXI, or ``.emc``."""
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a directory, not a photon file")
    with reading(path):
        if not h5py.is_hdf5(path):
            return EmcSource(path)
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise InputError(path, f"unreadable HDF5 file ({first_line(exc)})") from exc
    try:
        with reading(path):
            if any(key in f for key in ("num_pix", "place_ones", "place_multi", "count_multi")):
                return HDF5Source(path, f)
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
        raise InputError(path, f"unreadable list of photon files ({first_line(exc)})") from exc
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


class PhotonDataset:
    """The files of a dataset, opened (headers checked) and numbered as one frame sequence."""

    def __init__(self, spec, num_pix: int | None = None):
        self.files = photon_files(spec)
        single = isinstance(spec, str | os.PathLike)
        self.label = Path(spec) if single else self.files[0]
        self.sources: list[PhotonSource] = []
        try:
            for path in self.files:
                self.sources.append(open_source(path))
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
        self.starts = frame_offsets(np.array([s.num_frames for s in self.sources], dtype=np.int64))
        self.num_frames = int(self.starts[-1])

    def __enter__(self) -> PhotonDataset:
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
    with PhotonDataset(spec, num_pix) as dataset:
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
    with PhotonDataset(spec, num_pix) as dataset:
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
    with PhotonDataset(spec, num_pix) as dataset:
        start, stop = shard_bounds(dataset.num_frames, rank, size)
        return dataset.read_range(start, stop), start


def iter_chunks(
    spec, chunk_frames: int, num_pix: int | None = None
) -> Iterator[tuple[int, SparsePhotons]]:
    """Stream a dataset as ``(start, photons)`` blocks of at most ``chunk_frames`` frames."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be positive, got {chunk_frames}")
    with PhotonDataset(spec, num_pix) as dataset:
        for start in range(0, dataset.num_frames, chunk_frames):
            yield start, dataset.read_range(start, min(start + chunk_frames, dataset.num_frames))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def read_cxi(path: str | os.PathLike, frames=None, num_pix: int | None = None) -> SparsePhotons:
    """Read the dense frames of a CXI file (all, or ``frames`` as in ``read_photons``) as sparse.

    ``num_pix``, when given, must equal ``ny * nx``.
    """
    path = Path(path)
    source = open_source(path)
    is_cxi = isinstance(source, CxiSource)
    source.close()
    if not is_cxi:
        raise InputError(path, f"not a CXI file: no dataset '{CXI_DATA}'")
    with PhotonDataset(path, num_pix) as dataset:
        return dataset.read(frames)
