"""EMC checkpoints (``<out>.ckpt.h5``, written after every iteration by ``classify2d`` and
``emc3d``, read by their ``--resume``; removed when the run finishes).

``intens`` the models, ``scale (N,)`` every frame's scale, ``iteration`` (scalar) the iterations
done; attributes ``log`` (JSON list of the per-iteration rows) and ``params`` (JSON: what a resume
must agree on: the settings that change the result and the photon files' fingerprint), plus any
engine-specific attribute (classify2d: ``sparse_below``).
"""

from __future__ import annotations

import json

import h5py

from spiscape.errors import InputError
from spiscape.utils.atomic import atomic_path


def write_checkpoint(path, models, scale, iteration: int, log_rows: list, fingerprint: dict,
                     attrs: dict | None = None) -> None:
    """Write a checkpoint atomically (layout in the module docstring)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f["intens"] = models
        f["scale"] = scale
        f["iteration"] = iteration
        f.attrs["log"] = json.dumps(log_rows)
        f.attrs["params"] = json.dumps(fingerprint)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value


def read_checkpoint(path, fingerprint: dict) -> dict:
    """A checkpoint's ``intens``, ``scale``, ``iteration`` and ``log_rows``; InputError when it
    is unreadable or was made with another ``fingerprint``."""
    try:
        with h5py.File(path, "r") as f:
            out = {"intens": f["intens"][:], "scale": f["scale"][:],
                   "iteration": int(f["iteration"][()]),
                   "log_rows": json.loads(f.attrs["log"])}
            saved = json.loads(f.attrs["params"])
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(path, f"unreadable checkpoint ({exc}); delete it to start "
                               "afresh") from None
    if saved != json.loads(json.dumps(fingerprint)):
        raise InputError(path, "checkpoint was made with other parameters or data; delete it "
                               "or run without --resume")
    return out
