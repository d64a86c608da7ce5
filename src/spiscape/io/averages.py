"""``averages.h5``: the 2D class averages of all bootstrap replicates (written by ``spiscape
averages``; read by commonlines, embed, embed-new, landscape, orient, vae, phase and the health
checks).

Layout (HDF5):

- ``intens (A, S, S)`` float64: the class models, photons per pixel at frame scale 1, the beam at
  grid index ((S-1)/2, (S-1)/2), first axis along the detector's x;
- ``support (S, S)`` bool: the grid points the detector reaches at some rotation in every
  replicate (outside it, and in the beamstop, an average holds no measurement: 0 there means
  "not measured", not "dark");
- ``replicate (A,)`` int32 and ``class (A,)`` int32: where each average came from
  (``classify2d/rep{replicate}.h5``, class number);
- ``frames (A,)`` float: its summed occupancy (effective frames);
- attributes ``replicates`` (JSON list of the replicate files) and ``min_frames``;
- synthetic averages (made for tests and benchmarks from known shapes) may carry their truth:
  ``truth_t (A,)``, ``truth_label (A,)``, ``shape_index (A,)`` (:func:`read_average_truth`).

A file without ``support`` (older than the contract) gets the grid points non-zero in some
average, with a warning; one without ``replicate``/``class``/``frames`` gets -1 / NaN.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.io.hdf5 import open_input
from spiscape.utils.atomic import atomic_path

log = logging.getLogger(__name__)


@dataclass
class Averages:
    """The contents of ``averages.h5`` (``intens`` is None when read without it)."""

    intens: np.ndarray | None  # (A, S, S) float64
    support: np.ndarray  # (S, S) bool
    replicate: np.ndarray  # (A,) int32
    klass: np.ndarray  # (A,) int32, "class" in the file
    frames: np.ndarray  # (A,) effective frames
    count: int = 0
    size: int = 0
    path: str = ""


def read_averages(path, with_intens: bool = True) -> Averages:
    """``averages.h5``, validated (InputError naming the file otherwise): a non-empty (A, S, S)
    stack without NaN, a support of the same grid that is not empty, per-average arrays of A."""
    with open_input(path, "an averages file") as f:
        shape = f["intens"].shape
        count = shape[0] if len(shape) else 0
        intens = f["intens"][()].astype(np.float64) if with_intens or "support" not in f else None
        support = f["support"][()].astype(bool) if "support" in f else None
        data = {key: f[key][()] if key in f else np.full(count, -1, np.int32)
                for key in ("replicate", "class")}
        data["frames"] = f["frames"][()] if "frames" in f else np.full(count, np.nan)
    if len(shape) != 3 or shape[1] != shape[2] or shape[0] == 0:
        raise InputError(path, f"intens has shape {shape}, expected (A, S, S) with A > 0")
    if intens is not None:
        bad = ~np.isfinite(intens)
        if bad.any():
            first = int(np.argwhere(bad.any(axis=(1, 2)))[0, 0])
            raise InputError(path, f"intens holds NaN or infinite values ({int(bad.sum())} "
                                   f"pixels, first in average {first})")
    if support is None:
        log.warning("%s has no support; using the grid points non-zero in some average", path)
        support = np.any(intens != 0, axis=0)
    if support.shape != tuple(shape[1:]):
        raise InputError(path, f"support {support.shape} does not match intens {shape}")
    if not support.any():
        raise InputError(path, "support is empty: no grid point was measured")
    for key in ("replicate", "class", "frames"):
        if data[key].shape != (count,):
            raise InputError(path, f"{key} has shape {data[key].shape}, expected ({count},)")
    return Averages(intens=intens if with_intens else None, support=support,
                    replicate=data["replicate"], klass=data["class"], frames=data["frames"],
                    count=count, size=shape[1], path=str(path))


def read_average_truth(path) -> tuple[np.ndarray, np.ndarray] | None:
    """(``truth_t``, ``truth_label``) of synthetic averages, None for averages of real frames."""
    with open_input(path, "an averages file") as f:
        if "truth_t" in f and "truth_label" in f:
            return f["truth_t"][()], f["truth_label"][()]
    return None


#: what synthetic averages may carry beside the contents
TRUTH_KEYS = ("truth_t", "truth_label", "shape_index")


def write_averages(path, averages: Averages, replicate_paths, min_frames: float,
                   truth: dict | None = None) -> None:
    """Write ``averages.h5`` atomically (layout in the module docstring); ``truth``: the
    :data:`TRUTH_KEYS` of synthetic averages."""
    unknown = set(truth or {}) - set(TRUTH_KEYS)
    if unknown:
        raise ValueError(f"averages truth keys: unknown {sorted(unknown)}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f["intens"] = averages.intens
        f["replicate"] = averages.replicate
        f["class"] = averages.klass
        f["frames"] = averages.frames
        f["support"] = averages.support
        for key, value in (truth or {}).items():
            f[key] = value
        f.attrs["replicates"] = json.dumps([str(Path(p)) for p in replicate_paths])
        f.attrs["min_frames"] = min_frames
