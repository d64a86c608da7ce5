"""Gather the class averages of all bootstrap replicates into one file (DESIGN.md contract).

``averages.h5``: ``intens (A, S, S)`` the class models (photons per pixel at scale 1, beam at
grid index ((S-1)/2, (S-1)/2), first axis along the detector's x), ``replicate (A,)`` and
``class (A,)`` where each came from, ``frames (A,)`` its summed occupancy (effective frames), and
``support (S, S)`` the grid points the detector reaches at some rotation (outside it, and in the
beamstop, an average holds no measurement: 0 there means "not measured", not "dark").
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.utils.atomic import atomic_path


def read_replicate(path) -> dict:
    """The parts of a classify2d replicate file that later stages use, validated."""
    try:
        with h5py.File(path, "r") as f:
            rep = {
                "intens": f["intens"][:],
                "occupancies": f["occupancies"][:],
                "frames": f["frames"][:],
                "support": f["support"][:].astype(bool),
                "params": json.loads(f.attrs["params"]),
            }
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(path, f"not a readable classify2d replicate ({exc})") from None
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
