"""Dragonfly's HDF5 photon files (``.h5``/``.hdf5``; recognised on read by the HDF5 signature).

    ``num_pix``       int32, shape ``(1,)`` (shape ``()`` accepted on read)
    ``place_ones``    variable-length int32 (``h5py.vlen_dtype(np.int32)``), shape ``(num_frames,)``
    ``place_multi``   variable-length int32, shape ``(num_frames,)``
    ``count_multi``   variable-length int32, shape ``(num_frames,)``; same lengths as place_multi
    ``ones``, ``multi`` int32, shape ``(num_frames,)``: the per-frame lengths of ``place_ones``
                      and ``place_multi``. Always written; optional on read, checked when present.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.io.sources import PhotonSource, reading
from spiscape.io.sparse import SparsePhotons


class HDF5Source(PhotonSource):
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
        with reading(self.path):
            ones, place_ones = self._flatten("place_ones", selection)
            multi, place_multi = self._flatten("place_multi", selection)
            counts, count_multi = self._flatten("count_multi", selection)
        self._check_lengths("place_multi", multi, "count_multi", counts, numbers)
        for name, lengths, flat in (("ones", ones, "place_ones"), ("multi", multi, "place_multi")):
            if name in self.tables:
                table = self.tables[name][selection]
                self._check_lengths(flat, lengths, f"'{name}'", table, numbers)
        with reading(self.path):
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


