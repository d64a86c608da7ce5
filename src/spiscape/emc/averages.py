"""Gather the class averages of all bootstrap replicates into one file (DESIGN.md contract).

``averages.h5``: ``intens (A, S, S)`` the class models (photons per pixel at scale 1, beam at
grid index ((S-1)/2, (S-1)/2), first axis along the detector's x), ``replicate (A,)`` and
``class (A,)`` where each came from, ``frames (A,)`` its summed occupancy (effective frames), and
``support (S, S)`` the grid points the detector reaches at some rotation (outside it, and in the
beamstop, an average holds no measurement: 0 there means "not measured", not "dark").
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.io.hdf5 import open_input
from spiscape.utils.atomic import atomic_path

log = logging.getLogger(__name__)


def read_replicate(path) -> dict:
    """The parts of a classify2d replicate file that later stages use, validated."""
    with open_input(path, "a classify2d replicate") as f:
        rep = {
            "intens": f["intens"][:],
            "occupancies": f["occupancies"][:],
            "frames": f["frames"][:],
            "support": f["support"][:].astype(bool),
            "params": json.loads(f.attrs["params"]),
        }
    intens, occ = rep["intens"], rep["occupancies"]
    if intens.ndim != 3 or intens.shape[1] != intens.shape[2]:
        raise InputError(path, f"intens has shape {intens.shape}, expected (M, S, S)")
    if occ.shape != (rep["frames"].size, intens.shape[0]):
        raise InputError(path, f"occupancies {occ.shape} do not match {rep['frames'].size} frames "
                               f"x {intens.shape[0]} classes")
    if not np.all(np.isfinite(intens)):
        raise InputError(path, "intens holds NaN or infinite values")
    if rep["frames"].size == 0:
        raise InputError(path, "empty replicate: no frames")
    return rep


def read_averages(path, with_intens: bool = True) -> dict:
    """averages.h5 for the stages that read it, validated (InputError otherwise).

    Returns ``intens`` (A, S, S) float64 (None unless ``with_intens``), ``support`` (S, S),
    ``replicate``, ``class``, ``frames`` (A,) (-1 / NaN when a file lacks them), ``count``,
    ``size`` and ``path``. A file without ``support`` (written before it was in the contract) gets
    the grid points non-zero in some average, with a warning.
    """
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
    return {**data, "intens": intens if with_intens else None, "support": support,
            "count": count, "size": shape[1], "path": str(path)}


def collect_averages(replicate_paths, min_frames: float = 5.0) -> dict:
    """The classes of every replicate holding at least ``min_frames`` frames, concatenated."""
    intens, replicate, klass, frames = [], [], [], []
    size = support = None
    for number, path in enumerate(replicate_paths):
        rep = read_replicate(path)
        if size is None:
            size = rep["intens"].shape[1]
        elif rep["intens"].shape[1] != size:
            raise InputError(path, f"grid size {rep['intens'].shape[1]} differs from {size}")
        support = rep["support"] if support is None else support & rep["support"]
        weight = rep["occupancies"].sum(axis=0)
        keep = np.flatnonzero(weight >= min_frames)
        intens.append(rep["intens"][keep])
        replicate.append(np.full(keep.size, rep["params"].get("replicate", number), np.int32))
        klass.append(keep.astype(np.int32))
        frames.append(weight[keep])
    if not intens or sum(x.shape[0] for x in intens) == 0:
        raise InputError(replicate_paths[0] if replicate_paths else None,
                         f"no class holds {min_frames} frames or more; nothing to gather")
    result = {
        "intens": np.concatenate(intens),
        "replicate": np.concatenate(replicate),
        "class": np.concatenate(klass),
        "frames": np.concatenate(frames),
        "support": support,
    }
    return result


def write_averages(result: dict, out, replicate_paths, min_frames: float) -> None:
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        for key, value in result.items():
            f[key] = value
        f.attrs["replicates"] = json.dumps([str(Path(p)) for p in replicate_paths])
        f.attrs["min_frames"] = min_frames


def gather_averages(replicate_paths, out, min_frames: float = 5.0) -> dict:
    """Collect the averages of the replicates and write averages.h5 (DESIGN.md contract)."""
    result = collect_averages(replicate_paths, min_frames)
    write_averages(result, out, replicate_paths, min_frames)
    return result
