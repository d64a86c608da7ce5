"""What every photon file reader is (:class:`PhotonSource`: a header, reads of frame ranges or
sorted frame sets) and the helpers they share: low-level failures as one-line InputErrors,
frame sets split into runs for batched reads."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from spiscape.errors import InputError
from spiscape.io.sparse import SparsePhotons


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__


@contextlib.contextmanager
def reading(path: Path):
    """Turn low-level failures while reading ``path`` into InputError."""
    try:
        yield
    except InputError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
        raise InputError(path, f"unreadable ({first_line(exc)})") from exc


def split_runs(frames: np.ndarray, max_gap: int, max_span: int) -> list[np.ndarray]:
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


class PhotonSource:
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
