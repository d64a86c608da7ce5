"""``frames.h5``: each frame's place in the landscape (written by ``spiscape landscape``; read by
``spiscape select``, the health checks and the summary). How the places are computed is
:mod:`spiscape.embed.landscape`.

Layout (HDF5), one row per frame of the dataset:

``clpca``          f8 ``(N, k)``  embedding coordinates of each frame (NaN when never placed)
``label``          i8 ``(N,)``    cluster (-1 when never placed, or when the vote went to outliers)
``latent``         f4 ``(N, z)``  VAE latent coordinates; all NaN until the VAE stage fills it
                                  (``z = 1`` placeholder column)
``num_replicates`` i4 ``(N,)``    replicates that placed the frame
``label_weight``   f8 ``(N,)``    share of the vote won by the frame's cluster (confidence)

Attributes: ``num_frames``, ``components``, ``method`` (of the embedding), ``embedding``,
``averages``, ``replicates`` and ``photons`` (JSON lists of paths; photons empty when the
landscape was made without them), ``latent_note``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.io.hdf5 import open_input
from spiscape.utils.atomic import atomic_path


def write_landscape(path, result: dict, attrs: dict, latent=None) -> None:
    """Write frames.h5 (layout in the module docstring) atomically; ``latent`` (N, z) the VAE's
    per-frame latents, or None (one all-NaN column until the VAE has run)."""
    num = result["coords"].shape[0]
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f["clpca"] = result["coords"]
        f["label"] = result["label"]
        if latent is None:
            latent = np.full((num, 1), np.nan)
        f["latent"] = np.asarray(latent, dtype=np.float32)
        f["num_replicates"] = result["num_replicates"]
        f["label_weight"] = result["label_weight"]
        f.attrs["num_frames"] = num
        f.attrs["components"] = result["coords"].shape[1]
        f.attrs["latent_note"] = (
            "the VAE latent of each frame (occupancy-weighted over its classes' averages), NaN "
            "for frames in no trained average" if np.isfinite(latent).any() else
            "latent is all NaN (one placeholder column): the VAE has not run for this dataset")
        for key, value in attrs.items():
            f.attrs[key] = value


def read_landscape(path) -> dict:
    """``clpca``, ``label``, ``latent`` and attributes of a frames.h5."""
    path = Path(path)
    with open_input(path, "a landscape file") as f:
        data = {key: f[key][()] for key in ("clpca", "label")}
        data["latent"] = f["latent"][()] if "latent" in f else None
        data["attrs"] = dict(f.attrs)
    if data["clpca"].ndim != 2 or data["label"].shape != (data["clpca"].shape[0],):
        raise InputError(path, f"clpca {data['clpca'].shape} and label {data['label'].shape} "
                               "do not describe the same frames")
    return data
