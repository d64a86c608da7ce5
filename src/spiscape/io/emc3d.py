"""``emc3d.h5``: the multi-model 3D EMC's result (written by ``spiscape emc3d``, read by its
figures, ``spiscape orient --reference-file`` and the tests).

``intens (K, V, V, V)`` float64: the K models' intensities on a V³ grid, q = 0 at index V // 2,
in the detector file's voxel units (photons per pixel at scale 1); ``occupancy (K,)``: each
model's share of the frames (summed probabilities) in the last iteration. Per frame, in the
photon files' order (frames without a photon on a used pixel: model −1, quaternion NaN):
``model (N,)`` int32 the most probable model, ``quaternion (N, 4)`` its orientation (scalar
first; the frame shows the model at R q), ``probability (N,)`` of that (model, orientation),
``log_likelihood (N,)`` the frame's log-likelihood under the mixture (up to a constant),
``scale (N,)``. ``log``: one row per iteration (iteration, beta_mean, rms_change, mutual_info,
log_likelihood, seconds) as a compound table, and the per-iteration occupancies
``log_occupancy (iterations, K)``. Attributes: ``params`` (JSON), ``detector``, ``photons``
(JSON list), ``num_orientations``; with ``--held-out``: ``held_out_frames`` (left out of the fit:
model −1, quaternion NaN), ``held_out_loglik_per_frame`` and ``held_out_loglik_per_photon``
(their mean log-likelihood under the fitted mixture, :meth:`spiscape.emc3d.run.EMC3D.
held_out_loglik`, comparable between runs with different K and the same seed).

With ``--refine-cubic`` (the workflow's default): ``anisotropic_share_m3m (K,)``, the share of
each model's anisotropic log-intensity power that m-3m keeps, and the attribute ``refined_m3m``
(JSON: model number → file name): those models' intensities are the m-3m refinement of their
frames alone, whose own emc3d.h5 (one model, the frames' orientations in m-3m's asymmetric unit)
lies beside this file as ``<stem>.model<K>.h5``; the per-frame datasets and the log stay the
multi-model run's.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.io.hdf5 import open_input, plain_attr
from spiscape.utils.atomic import atomic_path

FRAME_DATASETS = ("model", "quaternion", "probability", "log_likelihood", "scale")
LOG_COLUMNS = ("iteration", "beta_mean", "rms_change", "mutual_info", "log_likelihood",
               "seconds")


@dataclass
class EMC3DResult:
    intens: np.ndarray
    occupancy: np.ndarray
    frames: dict
    log: dict
    attrs: dict


def write_emc3d(path, models, frames: dict, occupancy, log_rows: list, attrs: dict) -> None:
    """Write ``emc3d.h5`` atomically (layout in the module docstring)."""
    missing = [k for k in FRAME_DATASETS if k not in frames]
    if missing:
        raise ValueError(f"emc3d frame datasets missing: {missing}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("intens", data=np.asarray(models, dtype=np.float64),
                         compression="gzip", compression_opts=1)
        f["occupancy"] = np.asarray(occupancy, dtype=np.float64)
        for key in FRAME_DATASETS:
            f[key] = frames[key]
        table = np.array([tuple(row[c] for c in LOG_COLUMNS) for row in log_rows],
                         dtype=[(c, "f8") for c in LOG_COLUMNS])
        f["log"] = table
        f["log_occupancy"] = np.array([row["occupancy"] for row in log_rows], dtype=np.float64)
        for key, value in attrs.items():
            f.attrs[key] = value


def read_emc3d(path, volumes: bool = True) -> EMC3DResult:
    """``emc3d.h5`` validated (``volumes=False`` skips the models' intensities)."""
    with open_input(path, "an emc3d result") as f:
        for key in ("intens", "occupancy", *FRAME_DATASETS, "log"):
            if key not in f:
                raise InputError(path, f"missing dataset '{key}': not a spiscape emc3d result")
        shape = f["intens"].shape
        intens = f["intens"][()] if volumes else None
        occupancy = f["occupancy"][()]
        frames = {k: f[k][()] for k in FRAME_DATASETS}
        table = f["log"][()]
        log = {c: table[c] for c in table.dtype.names}
        log["occupancy"] = f["log_occupancy"][()]
        attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
    if len(shape) != 4 or not shape[1] == shape[2] == shape[3] or occupancy.shape != shape[:1]:
        raise InputError(path, f"intens has shape {shape}, occupancy {occupancy.shape}: "
                               "expected (K, V, V, V) and (K,)")
    n = frames["model"].shape[0]
    if any(v.shape[0] != n for v in frames.values()) or frames["quaternion"].shape[1:] != (4,):
        raise InputError(path, "its per-frame datasets do not describe the same frames")
    return EMC3DResult(intens=intens, occupancy=occupancy, frames=frames, log=log, attrs=attrs)


def read_start_models(path) -> np.ndarray:
    """Start models for ``spiscape emc3d --start-models``: the ``intens (K, V, V, V)`` of any HDF5
    file that has one (an emc3d.h5, Dragonfly's output or start model file), finite and not
    negative, as float64."""
    with open_input(path, "a models file") as f:
        if "intens" not in f:
            raise InputError(path, "missing dataset 'intens': not a models file (K, V, V, V)")
        intens = np.asarray(f["intens"][()], dtype=np.float64)
    if intens.ndim == 3:
        intens = intens[None]
    if intens.ndim != 4 or not intens.shape[1] == intens.shape[2] == intens.shape[3]:
        raise InputError(path, f"intens has shape {intens.shape}: expected (K, V, V, V)")
    if not np.isfinite(intens).all():
        raise InputError(path, "intens has NaN or infinite values")
    if (intens < 0).mean() > 0.5:
        raise InputError(path, "intens is mostly negative: not an intensity")
    return np.maximum(intens, 0)
