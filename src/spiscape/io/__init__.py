"""Reading and writing spiscape's inputs: detector geometry and photon frames.

Formats are Dragonfly's (so Dragonfly reads what spiscape writes) plus dense CXI frames; each is
documented in the module that reads it: :mod:`.detector`, :mod:`.photons`, :mod:`.cxi`. Every
reader raises :class:`spiscape.errors.InputError` (the file and one line) for bad input, and every
writer writes atomically.
"""

from spiscape.io.cxi import read_cxi, write_cxi
from spiscape.io.detector import Detector, read_detector, write_detector
from spiscape.io.photons import (
    PhotonWriter,
    SparsePhotons,
    count_frames,
    iter_chunks,
    photon_files,
    photon_header,
    read_photons,
    read_shard,
    shard_bounds,
    write_photons,
)

__all__ = [
    "Detector",
    "PhotonWriter",
    "SparsePhotons",
    "count_frames",
    "iter_chunks",
    "photon_files",
    "photon_header",
    "read_cxi",
    "read_detector",
    "read_photons",
    "read_shard",
    "shard_bounds",
    "write_cxi",
    "write_detector",
    "write_photons",
]
