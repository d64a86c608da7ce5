"""``classify2d/rep{r}.h5``: one bootstrap replicate of EMC 2D classification (written by
``spiscape classify2d``; read by averages, landscape, embed, vae).

Layout (HDF5):

- ``intens (M, S, S)`` float64: the class models (or their sharpened form, docs/methods.md),
  photons per pixel at frame scale 1, the beam at grid index ((S-1)/2, (S-1)/2);
- ``frames (n,)`` int64: the global indices (over the dataset's photon files, in order) of the
  frames this replicate classified; frames without a photon on a used pixel are left out and
  listed in ``empty_frames``;
- ``occupancies (n, M)`` float32 (gzip): each frame's probability summed over rotations;
- ``best_class (n,)``, ``best_rotation (n,)`` int32, ``scale (n,)`` float64 (φ_d);
- ``log``: the per-iteration table (iteration, seconds, rms_change, mutual_info,
  log_likelihood, beta);
- ``angles (R,)``, ``model_pixels (P,)`` (the detector pixels merged, in the engine's order),
  ``support (S, S)`` bool (grid points the detector reaches at some rotation);
- attributes: ``params`` (JSON of the EMC parameters, with ``replicate``), ``photons`` (JSON list
  of the files), ``detector``, ``size``, ``centre``, ``ranks``, ``peak_memory_mb_per_rank``,
  ``frames_per_rank``, ``dense_pixels``, ``sparse_below``, ``threads_per_rank``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.io.hdf5 import open_input, plain_attr
from spiscape.utils.atomic import atomic_path

#: the datasets every replicate file holds, in the order they are written
DATASETS = ("intens", "frames", "occupancies", "best_rotation", "best_class", "scale", "log",
            "angles", "model_pixels", "support", "empty_frames")


@dataclass
class Replicate:
    """A replicate file's contents; what a reader did not ask for is None."""

    number: int  # the replicate number (params["replicate"])
    frames: np.ndarray  # (n,) int64 global frame indices
    occupancies: np.ndarray  # (n, M)
    intens: np.ndarray | None = None  # (M, S, S)
    support: np.ndarray | None = None  # (S, S) bool
    params: dict = field(default_factory=dict)
    path: str = ""
    # with details: the per-iteration table and each frame's best class and rotation
    log: np.ndarray | None = None
    best_class: np.ndarray | None = None
    best_rotation: np.ndarray | None = None
    angles: np.ndarray | None = None
    model_pixels: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)  # the file's attributes (detector, photons, ...)


def read_replicate(path, fallback_number: int = 0, models: bool = True,
                   details: bool = False) -> Replicate:
    """A replicate file, validated (InputError naming it otherwise). With ``models`` False only
    the frames, occupancies and number are read (the landscape of millions of frames); with
    ``details`` also the ``log`` table, ``best_class``, ``best_rotation``, ``angles`` and
    ``model_pixels``."""
    extra = {}
    with open_input(path, "a classify2d replicate") as f:
        if details:
            extra = {key: f[key][()] for key in ("log", "best_class", "best_rotation", "angles",
                                                 "model_pixels")}
        frames = f["frames"][()].astype(np.int64)
        occupancies = f["occupancies"][()]  # kept as stored (float32)
        try:
            params = json.loads(f.attrs["params"]) if "params" in f.attrs else {}
        except ValueError as exc:
            raise InputError(path, f"attribute 'params' is not JSON ({exc})") from None
        attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
        intens = f["intens"][()] if models else None
        support = f["support"][()].astype(bool) if models else None
    if frames.size == 0:
        raise InputError(path, "empty replicate: no frames")
    if occupancies.ndim != 2 or occupancies.shape[0] != frames.size:
        raise InputError(path, f"occupancies {occupancies.shape} do not match {frames.size} "
                               "frames")
    if not np.all(np.isfinite(occupancies)):
        raise InputError(path, "occupancies hold NaN or infinite values")
    if intens is not None:
        if intens.ndim != 3 or intens.shape[1] != intens.shape[2]:
            raise InputError(path, f"intens has shape {intens.shape}, expected (M, S, S)")
        if occupancies.shape[1] != intens.shape[0]:
            raise InputError(path, f"occupancies {occupancies.shape} do not match "
                                   f"{frames.size} frames x {intens.shape[0]} classes")
        if not np.all(np.isfinite(intens)):
            raise InputError(path, "intens holds NaN or infinite values")
        if support.shape != intens.shape[1:]:
            raise InputError(path, f"support {support.shape} does not match intens "
                                   f"{intens.shape}")
    for key in ("best_class", "best_rotation"):
        if key in extra and extra[key].shape != frames.shape:
            raise InputError(path, f"{key} has shape {extra[key].shape}, expected "
                                   f"({frames.size},)")
    return Replicate(number=int(params.get("replicate", fallback_number)), frames=frames,
                     occupancies=occupancies, intens=intens, support=support, params=params,
                     path=str(path), attrs=attrs, **extra)


def replicate_files(results) -> list[Path]:
    """The replicate files of a dataset's results folder (``classify2d/rep*.h5``, checkpoints
    left out), sorted."""
    return sorted(p for p in (Path(results) / "classify2d").glob("rep*.h5")
                  if ".ckpt" not in p.name)


def read_replicates(paths, models: bool = False) -> list[Replicate]:
    """Several replicate files; their replicate numbers must differ."""
    reps = [read_replicate(p, n, models=models) for n, p in enumerate(paths)]
    numbers = [r.number for r in reps]
    if len(set(numbers)) != len(numbers):
        raise InputError(paths[0], f"replicate numbers repeat across files: {numbers}")
    return reps


def write_replicate(path, datasets: dict, attrs: dict) -> None:
    """Write a replicate file atomically: every dataset of :data:`DATASETS` (occupancies
    compressed), then the attributes (layout in the module docstring)."""
    missing = [key for key in DATASETS if key not in datasets]
    if missing or set(datasets) - set(DATASETS):
        raise ValueError(f"replicate datasets: missing {missing}, unknown "
                         f"{sorted(set(datasets) - set(DATASETS))}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key in DATASETS:
            if key == "occupancies":
                f.create_dataset(key, data=datasets[key], compression="gzip")
            else:
                f[key] = datasets[key]
        for key, value in attrs.items():
            f.attrs[key] = value
