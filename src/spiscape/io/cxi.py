"""Dense photon frames in CXI files, converted to sparse frames as they are read.

Format
------
A CXI file (HDF5) holds the frames in ``entry_1/data_1/data``, shape ``(num_frames, ny, nx)`` or
``(num_frames, num_pix)``, as photon counts: integers, or floats whose values are integral
(detector ADUs must be converted to photons first). Negative, NaN or non-integral values are
errors. Pixel ``(iy, ix)`` becomes sparse pixel index ``iy * nx + ix`` (row-major), so the
detector file used with these frames must list its pixels in that order; ``num_pix = ny * nx``.

Frames are converted a block at a time, so files larger than memory can be read. A CXI file can
also be one of the files of a photon dataset (:func:`spiscape.io.photons.read_photons`).
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.io.sources import PhotonSource, reading, split_runs
from spiscape.io.sparse import SparsePhotons
from spiscape.utils.atomic import atomic_path

CXI_DATA = "entry_1/data_1/data"
_BLOCK_BYTES = 64 << 20


class CxiSource(PhotonSource):
    """Reader of the dense frames in one CXI file (kept open while the dataset is read)."""

    def __init__(self, path: Path, f: h5py.File):
        self.path = path
        self.file = f
        dset = f.get(CXI_DATA)
        if not isinstance(dset, h5py.Dataset):
            raise InputError(path, f"missing dataset '{CXI_DATA}'")
        if dset.ndim not in (2, 3):
            raise InputError(
                path, f"'{CXI_DATA}' has shape {dset.shape}; expected (frames, ny, nx) or "
                "(frames, num_pix)"
            )
        if dset.dtype.kind not in "biuf":
            raise InputError(path, f"'{CXI_DATA}' holds {dset.dtype}, not photon counts")
        self.data = dset
        self.num_frames = int(dset.shape[0])
        self.num_pix = int(np.prod(dset.shape[1:]))
        if self.num_pix == 0:
            raise InputError(path, f"'{CXI_DATA}' has frames of shape {dset.shape[1:]}: no pixels")
        self.block_frames = max(1, _BLOCK_BYTES // (self.num_pix * dset.dtype.itemsize))

    def read_range(self, start: int, stop: int) -> SparsePhotons:
        parts = []
        for a in range(start, stop, self.block_frames):
            b = min(a + self.block_frames, stop)
            parts.append(self._convert(slice(a, b), np.arange(a, b)))
        return SparsePhotons.concatenate(parts) if parts else SparsePhotons.empty(self.num_pix)

    def read_frames(self, frames: np.ndarray) -> SparsePhotons:
        """Frames at sorted, unique ``frames``.

        HDF5 point selections are slow on chunked, compressed image stacks, so this reads spans
        of nearby frames (gaps of up to 32 frames are read and dropped) and keeps the chosen.
        """
        if frames.size == 0:
            return SparsePhotons.empty(self.num_pix)
        parts = []
        for span in split_runs(frames, max_gap=32, max_span=self.block_frames):
            start, stop = int(span[0]), int(span[-1]) + 1
            dense = self._convert(slice(start, stop), np.arange(start, stop))
            parts.append(dense if stop - start == span.size else dense.select(span - start))
        return SparsePhotons.concatenate(parts)

    def _convert(self, selection, numbers: np.ndarray) -> SparsePhotons:
        """Dense frames at ``selection`` (numbered ``numbers`` in the file) as sparse frames."""
        with reading(self.path):
            block = self.data[selection].reshape(len(numbers), self.num_pix)
        try:
            return SparsePhotons.from_dense(block)
        except ValueError as exc:
            self._explain_bad_counts(block, numbers)
            raise InputError(self.path, f"not photon counts ({exc})") from exc

    def _explain_bad_counts(self, block: np.ndarray, numbers: np.ndarray) -> None:
        """Raise InputError naming the first value of ``block`` that is not a photon count."""
        value = block.ravel()
        checks = [(value < 0, "negative photon count")]
        if block.dtype.kind == "f":
            checks = [
                (~np.isfinite(value), "value is NaN or infinite"),
                (value != np.rint(value), "value is not an integer"),
            ] + checks
        checks.append((value > np.iinfo(np.int32).max, "count too large for int32"))
        for bad, problem in checks:
            if bad.any():
                where = int(np.argmax(bad))
                frame, pixel = divmod(where, self.num_pix)
                raise InputError(
                    self.path,
                    f"frame {numbers[frame]} pixel {pixel}: {problem} ({value[where]}); "
                    "expected photon counts",
                )

    def close(self) -> None:
        self.file.close()


def write_cxi(dense, path: str | os.PathLike) -> None:
    """Write dense photon counts ``(num_frames, ny, nx)`` or ``(num_frames, num_pix)`` as CXI."""
    dense = np.asarray(dense)
    if dense.ndim not in (2, 3):
        raise ValueError(
            f"dense frames must be (frames, ny, nx) or (frames, num_pix), got {dense.shape}"
        )
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("cxi_version", data=np.int32(150))
        if dense.size:
            f.create_dataset(CXI_DATA, data=dense, chunks=(1,) + dense.shape[1:],
                             compression="gzip", compression_opts=1)
        else:
            f.create_dataset(CXI_DATA, data=dense)
        f[CXI_DATA].attrs["axes"] = "experiment_identifier:y:x" if dense.ndim == 3 else (
            "experiment_identifier:x"
        )
