"""Writing sparse photons as Dragonfly HDF5 or ``.emc`` (by the output's suffix), chunk by chunk
and atomically (:class:`PhotonWriter`, :func:`write_photons`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.io.emcfile import EMC_HEADER_BYTES
from spiscape.io.photons import HDF5_SUFFIXES
from spiscape.io.sparse import (
    ARRAY_FIELDS,
    HDF5_CHUNK_FRAMES,
    HDF5_WRITE_FRAMES,
    VLEN_INT32,
    SparsePhotons,
    concat_arrays,
)
from spiscape.utils.atomic import atomic_path


def output_format(path: Path) -> str:
    """"hdf5" or "emc", from the suffix of an output photon file; InputError otherwise."""
    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        return "hdf5"
    if suffix == ".emc":
        return "emc"
    raise InputError(path, f"unknown photon file type '{suffix}'; use .h5, .hdf5 or .emc")


def emc_header(num_frames: int, num_pix: int) -> np.ndarray:
    header = np.zeros(EMC_HEADER_BYTES // 4, dtype="<i4")
    header[0], header[1] = num_frames, num_pix
    return header


def vlen_rows(flat: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """An object array of per-frame views, as h5py writes variable-length data."""
    rows = np.empty(offsets.size - 1, dtype=VLEN_INT32)
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
                name, shape=(0,), maxshape=(None,), dtype=VLEN_INT32,
                chunks=(HDF5_CHUNK_FRAMES,),
            )
        for name in ("ones", "multi"):
            self._h5.create_dataset(
                name, shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(HDF5_CHUNK_FRAMES,)
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
        for a in range(0, n, HDF5_WRITE_FRAMES):
            block = photons.select(slice(a, min(a + HDF5_WRITE_FRAMES, n)))
            # write_direct: Dataset.__setitem__ mistakes rows of equal length for a 2-D array
            rows = np.s_[n0 + a:n0 + a + block.num_frames]
            self._h5["place_ones"].write_direct(
                vlen_rows(block.place_ones, block.ones_offsets), dest_sel=rows
            )
            for name in ("place_multi", "count_multi"):
                self._h5[name].write_direct(
                    vlen_rows(getattr(block, name), block.multi_offsets), dest_sel=rows
                )

    def _finish(self) -> None:
        if self.kind == "hdf5":
            self._h5.close()
            return
        ones = concat_arrays([lengths[0] for lengths in self._lengths])
        multi = concat_arrays([lengths[1] for lengths in self._lengths])
        with open(self._tmp, "wb") as f:
            emc_header(self.num_frames, self.num_pix).tofile(f)
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
        emc_header(photons.num_frames, photons.num_pix).tofile(f)
        for name in ARRAY_FIELDS:
            getattr(photons, name).astype("<i4", copy=False).tofile(f)

