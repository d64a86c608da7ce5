"""``amortise/amortise.h5``: each frame's pose, conformation and scale from the amortised model
(written by ``spiscape amortise``, block by block; read by its figures, the scorers and
``bench/amortise.py``). One row per frame of the photon files, in their order, so that it lines up
with ``frames.h5`` of the same photons (the landscape's own file is not rewritten: a rule does
not change another rule's output).

Layout (HDF5):

``quaternion``          f8 ``(N, 4)`` scalar first (w, x, y, z): frame d shows the decoded
                        intensity at R_d q_t (the simulator's convention); defined modulo the
                        decoder's point group; after the local refinement when it ran
``quaternion_encoder``  f8 ``(N, 4)`` the encoder's best hypothesis (by likelihood)
``z``                   f4 ``(N, zdim)`` conformation: the 1D posterior mean at the refined pose
                        (zdim 1 with refinement), else the encoder's mean
``z_encoder``           f4 ``(N, zdim)`` the encoder's mean; ``z_logvar`` its log variance
``scale``               f8 ``(N,)`` the frame's maximum-likelihood scale (fluence x the
                        decoder's arbitrary intensity unit) at the final pose and z
``nll_per_photon``      f4 ``(N,)`` negative log-likelihood (without log k!) per photon
``pose_change_deg``     f4 ``(N,)`` the refinement's change of the encoder's rotation
``hypothesis``          i2 ``(N,)`` the encoder's hypothesis that won
``photons``             i4 ``(N,)`` photons on the pixels of the likelihood

Attributes: ``num_frames``, ``quaternion_convention``, ``photons`` (JSON list), ``detector``,
``warm_start``.
"""

from __future__ import annotations

import numpy as np

from spiscape.errors import InputError
from spiscape.io.hdf5 import open_input

FIELDS = {"quaternion": ("f8", 4), "quaternion_encoder": ("f8", 4), "z": ("f4", "zdim"),
          "z_encoder": ("f4", "zdim"), "z_logvar": ("f4", "zdim"), "scale": ("f8", None),
          "nll_per_photon": ("f4", None), "pose_change_deg": ("f4", None),
          "hypothesis": ("i2", None), "photons": ("i4", None)}


def create_datasets(f, num_frames: int, zdim: int) -> dict:
    """The per-frame datasets of an open, new amortise.h5, to be filled block by block."""
    out = {}
    for name, (dtype, width) in FIELDS.items():
        width = zdim if width == "zdim" else width
        shape = (num_frames,) if width is None else (num_frames, width)
        out[name] = f.create_dataset(name, shape, dtype)
    return out


def read_amortise(path) -> dict:
    """Every per-frame array of amortise.h5 and its attributes (``attrs``)."""
    with open_input(path, "an amortise file") as f:
        missing = [name for name in FIELDS if name not in f]
        if missing:
            raise InputError(path, f"not an amortise.h5 (missing {', '.join(missing)})")
        out = {name: f[name][()] for name in FIELDS}
        out["attrs"] = dict(f.attrs)
    if len({len(v) for k, v in out.items() if k != "attrs"}) != 1:
        raise InputError(path, "per-frame datasets of different lengths")
    out["z"] = np.asarray(out["z"], dtype=np.float64)
    return out
