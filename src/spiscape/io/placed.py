"""``placed.h5``: frames placed on a fixed landscape (written by ``spiscape place``).

One row per frame of the placed photon files, in order: ``clpca (N, k)`` the frame's
coordinates in the reference's landscape; ``label (N,)`` its cluster there;
``label_weight (N,)`` the share of its probability on that cluster; ``average (N,)``,
``rotation (N,)`` and ``probability (N,)`` its most probable reference average and in-plane
rotation and their probability; ``scale (N,)`` the fitted scale (fluence) for that view;
``loglik_per_photon (N,)`` how well that view explains the frame: the mean log-probability of
a photon landing where it did under the best view (scale-free; higher is better);
``misfit (N,)``: how differently from the best view the frame's photons fall (an estimate of
the χ² divergence over bins of equal expected share of the view, ~0 for a frame of the view;
``spiscape.embed.place``); ``outlier (N,)`` (bool): misfit above ``outlier_threshold``.
Attributes: ``reference`` (the results folder), ``photons`` (JSON list), ``detector``,
``progress`` (JSON: frames placed per file, for --follow's resume), ``outlier_threshold`` (the
reference's own frames' misfit at ``outlier_quantile``; NaN when it could not be calibrated, and
then no frame is flagged).
"""

from __future__ import annotations

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.io.hdf5 import open_input
from spiscape.utils.atomic import atomic_path

DATASETS = ("clpca", "label", "label_weight", "average", "rotation", "probability", "scale",
            "loglik_per_photon", "misfit", "outlier")


def write_placed(path, datasets: dict, attrs: dict) -> None:
    """Write ``placed.h5`` atomically (layout in the module docstring)."""
    missing = [key for key in DATASETS if key not in datasets]
    if missing:
        raise ValueError(f"placed datasets missing: {missing}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key in DATASETS:
            f[key] = datasets[key]
        for key, value in attrs.items():
            f.attrs[key] = value


def read_placed(path) -> dict:
    """``placed.h5`` as a dict of its datasets (and ``attrs``), validated."""
    with open_input(path, "a placed-frames file") as f:
        out = {key: f[key][()] for key in DATASETS}
        out["attrs"] = dict(f.attrs)
    n = out["label"].shape[0]
    if out["clpca"].ndim != 2 or any(np.shape(out[k])[0] != n for k in DATASETS):
        raise InputError(path, "its datasets do not describe the same frames")
    return out
