"""Dragonfly's binary ``.emc`` photon files.

All int32 little endian: a header of 1024 bytes = 256 int32, ``[0] = num_data`` (frames),
``[1] = num_pix``, the rest 0; then ``ones`` (num_data values), then ``multi`` (num_data values),
then every frame's ``place_ones`` concatenated, then every ``place_multi``, then every
``count_multi``. The file size is therefore exactly
``1024 + 8 num_data + 4 (sum(ones) + 2 sum(multi))`` bytes; anything else is an error. A file
that is not HDF5 and whose header padding is not zero is "not a photon file".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spiscape.errors import InputError
from spiscape.io.sources import PhotonSource, reading
from spiscape.io.sparse import SparsePhotons, frame_offsets, gather_positions

EMC_HEADER_BYTES = 1024


NOT_PHOTONS = ("not a photon file: neither HDF5 nor a Dragonfly .emc (a 1024-byte header of "
               "two counts and zeros)")


class EmcSource(PhotonSource):
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
        ones_offsets, multi_offsets = frame_offsets(ones), frame_offsets(multi)
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
        with reading(self.path):
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
        ones_sel, ones_pos = gather_positions(o_off, frames)
        multi_sel, multi_pos = gather_positions(m_off, frames)
        # A memory map reads only the pages that hold the chosen frames.
        with reading(self.path):
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


