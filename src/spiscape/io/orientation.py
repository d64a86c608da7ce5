"""``orientation.h5``: the orientation and gain of every class average (written by ``spiscape
orient``; read by vae, the health checks and the benchmarks).

Layout (HDF5), one row per average of ``averages.h5`` in its order:

- ``quaternion (A, 4)`` float64, scalar first (w, x, y, z), w >= 0, reduced to the fundamental
  zone of the point group, such that average a shows I(R_a q) at its grid points' q (the
  simulator's convention);
- ``cc (A,)``: the best correlation with a reference slice; ``gain (A,)`` = best CC / mean CC over
  the rotation grid ("cubicness"); ``mean_cc (A,)``; ``grid_cc (A, G)`` or (A, 0): the CCs on the
  coarse grid;
- attributes: ``reference``, ``reference_file``, ``size_nm``, ``point_group``, ``step_deg``,
  ``refine_deg``, ``num_rotations``, ``transform``, ``floor``, ``q_per_pixel_inv_nm``,
  ``quaternion_convention``, ``averages``, ``note``, ``info`` (JSON).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.io.hdf5 import open_input, plain_attr
from spiscape.utils.atomic import atomic_path

#: the datasets of the file, in the order they are written
DATASETS = ("quaternion", "cc", "gain", "mean_cc", "grid_cc")


@dataclass
class Orientation:
    quaternion: np.ndarray  # (A, 4) unit, w >= 0
    gain: np.ndarray  # (A,); a missing or non-positive gain reads as 1
    cc: np.ndarray  # (A,); NaN when the file has none
    attrs: dict = field(default_factory=dict)
    path: str = ""


def read_orientation(path, count: int | None = None) -> Orientation:
    """``orientation.h5``, validated: finite non-zero quaternions (normalised, w >= 0 on
    return), per-average arrays of one length (``count`` when given: the averages')."""
    with open_input(path, "an orientation file") as f:
        quat = np.asarray(f["quaternion"][()], dtype=np.float64)
        n = quat.shape[0] if quat.ndim == 2 else -1
        gain = np.asarray(f["gain"][()], dtype=np.float64) if "gain" in f else np.ones(n)
        cc = np.asarray(f["cc"][()], dtype=np.float64) if "cc" in f else np.full(n, np.nan)
        attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
    expected = count if count is not None else n
    if quat.shape != (expected, 4):
        what = f"({expected}, 4)" + (" (one per average)" if count is not None else "")
        raise InputError(path, f"quaternion has shape {quat.shape}, expected {what}")
    for key, value in (("gain", gain), ("cc", cc)):
        if value.shape != (expected,):
            raise InputError(path, f"{key} has shape {value.shape}, expected ({expected},)")
    norms = np.linalg.norm(quat, axis=1)
    if not np.all(np.isfinite(quat)) or np.any(norms < 1e-6):
        raise InputError(path, "quaternions must be finite and nonzero")
    quat = quat / norms[:, None]
    quat[quat[:, 0] < 0] *= -1.0  # q and -q are one rotation
    gain = np.where(np.isfinite(gain) & (gain > 0), gain, 1.0)
    return Orientation(quaternion=quat, gain=gain, cc=cc, attrs=attrs, path=str(path))


def write_orientation(path, datasets: dict, attrs: dict) -> None:
    """Write ``orientation.h5`` atomically: every dataset of :data:`DATASETS` as float64, then
    the attributes (layout in the module docstring)."""
    missing = [key for key in DATASETS if key not in datasets]
    if missing:
        raise ValueError(f"orientation datasets missing: {missing}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key in DATASETS:
            f.create_dataset(key, data=np.asarray(datasets[key], dtype=np.float64))
        for key, value in attrs.items():
            f.attrs[key] = value
