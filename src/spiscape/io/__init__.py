"""Reading and writing the files of a run, one module per file (docs/formats.md lists them).

Inputs in Dragonfly's formats (so Dragonfly reads what spiscape writes) plus dense CXI frames:
:mod:`.detector`, :mod:`.photons`, :mod:`.cxi`. Files handed between stages: :mod:`.replicate`
(``classify2d/rep{r}.h5``), :mod:`.averages` (``averages.h5``), :mod:`.commonlines` (tiles and
``commonlines.h5``), :mod:`.embedding` (``embedding.h5``), :mod:`.frames` (``frames.h5``),
:mod:`.orientation` (``orientation.h5``), :mod:`.volumes` (the VAE's ``volumes.h5``,
``latent.h5``, ``frame_latent.h5``), :mod:`.phasing` (``phasing.h5``, ``volume_curve.csv``),
:mod:`.truth` (a simulation's ``truth.h5``), :mod:`.weights` (the ``.pt`` files, weights only).
Each documents its layout in its docstring; every
reader raises :class:`spiscape.errors.InputError` (the file and one line) for bad input, and
every writer writes atomically.
"""

from spiscape.io.cxi import write_cxi
from spiscape.io.detector import Detector, read_detector, write_detector
from spiscape.io.photon_writer import PhotonWriter, write_photons
from spiscape.io.photons import (
    count_frames,
    iter_chunks,
    photon_files,
    photon_header,
    read_cxi,
    read_photons,
    read_shard,
    shard_bounds,
)
from spiscape.io.sparse import SparsePhotons

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
