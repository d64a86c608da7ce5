"""The VAE's files (written by ``spiscape vae``): ``vae/volumes.h5`` (read by ``spiscape phase``
and the health checks), ``vae/latent.h5`` (health) and ``vae/frame_latent.h5`` (``spiscape
landscape`` copies it into ``frames.h5``).

``volumes.h5``: ``z (K, zdim)`` float32, the latent points; ``intens (K, V, V, V)`` float32
(gzip, one chunk per volume), the 3D intensities along the latent (the decoder's, or, with
``spiscape vae --frame-refine``, the decoder's refined from the frames themselves and
interpolated between the refinement's latent points; attribute ``source`` says which), the beam
at voxel V // 2; ``has_data
(K,)`` bool, whether an average's latent lies within a grid step of the point (else the decoder's
extrapolation); attributes ``point_group``, ``centre_voxel``, ``q_per_voxel_inv_nm`` (when
known), ``q_min_measured``, ``q_max_measured`` (voxels: outside, the decoder extrapolates),
``q_step_pixels`` (from ``spiscape vae``: detector pixels per voxel, 1 unless ``--q-step``), and
the training settings.

``latent.h5``: ``mu (A, zdim)``, ``logvar (A, zdim)`` float32 of every average; ``selected (A,)``
bool, the averages trained on; with pose refinement ``quaternion_refined (A, 4)`` (scalar first,
fundamental zone) and ``pose_change_deg (A,)``.

``frame_latent.h5``: ``latent (N, zdim)`` float64, each frame's latent, NaN for frames in no
trained average. Attribute ``method``: ``posterior`` (the posterior mean over z of the frame's
photons under the decoder at its candidate classes' orientations,
:mod:`spiscape.vae.frame_posterior`; then also ``latent_sd (N, zdim)``, the posterior's standard
deviation, and ``latent_classes (N, zdim)``, the class route below; with the orientation
searched over all orientations, attribute ``poses`` ``global``, also ``size (N, 1)`` and
``size_sd (N, 1)``, the posterior mean and deviation of each frame's size factor relative to the
decoder's volume at its latent, within ``1 +- size_range``) or ``classes`` (the
occupancy-weighted mean of its classes' averages' latents). Files written before the attribute
existed are ``classes``. Readers take ``latent``.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.io.hdf5 import open_input
from spiscape.utils.atomic import atomic_path


@dataclass
class Volumes:
    z: np.ndarray  # (K, zdim) float64
    intens: np.ndarray  # (K, V, V, V) float32, the volumes asked for
    has_data: np.ndarray  # (K,) bool
    indices: list  # which volumes of the file
    q_per_voxel: float | None  # 1/nm, None when the file does not say
    q_min_measured: float | None  # voxels
    q_max_measured: float | None


def read_volumes(path, indices=None) -> Volumes:
    """``volumes.h5`` (or the volumes ``indices`` of it), validated: (K, V, V, V) cubes."""
    with open_input(path, "a volumes file") as f:
        if "intens" not in f:
            raise InputError(path, "no 'intens' dataset (expected vae/volumes.h5)")
        shape = f["intens"].shape
        idx = list(range(shape[0])) if indices is None else list(indices)
        if any(i < 0 or i >= shape[0] for i in idx):
            raise InputError(path, f"indices {idx} out of range 0..{shape[0] - 1}")
        intens = np.stack([f["intens"][i] for i in idx]).astype(np.float32)
        z = f["z"][()][idx] if "z" in f else np.arange(shape[0], dtype=np.float64)[idx, None]
        has_data = (np.asarray(f["has_data"][()], dtype=bool)[idx] if "has_data" in f
                    else np.ones(len(idx), dtype=bool))
        dq = f.attrs.get("q_per_voxel_inv_nm")
        limits = [float(f.attrs[key]) if key in f.attrs else None
                  for key in ("q_min_measured", "q_max_measured")]
    if intens.ndim != 4 or len(set(intens.shape[1:])) != 1:
        raise InputError(path, f"intens must be (K, V, V, V), got {intens.shape}")
    z = np.asarray(z, dtype=np.float64)
    return Volumes(z=z[:, None] if z.ndim == 1 else z, intens=intens, has_data=has_data,
                   indices=idx, q_per_voxel=None if dq is None else float(dq),
                   q_min_measured=limits[0], q_max_measured=limits[1])


def write_volumes(path, z, intens, has_data, q_per_voxel=None, point_group="m-3m",
                  attrs: dict | None = None) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f["z"] = np.asarray(z, dtype=np.float32)
        f.create_dataset("intens", data=np.asarray(intens, dtype=np.float32),
                         chunks=(1,) + intens.shape[1:], compression="gzip", shuffle=True)
        f["has_data"] = np.asarray(has_data, dtype=bool)
        f.attrs["point_group"] = point_group
        f.attrs["centre_voxel"] = intens.shape[1] // 2
        if q_per_voxel is not None:
            f.attrs["q_per_voxel_inv_nm"] = float(q_per_voxel)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value


def write_latent(path, mu, logvar, selected, poses: dict | None = None) -> None:
    """latent.h5: mu, logvar, selected; with pose refinement also quaternion_refined (A, 4) and
    pose_change_deg (A,) (from :func:`spiscape.vae.scoring.refined_poses`)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f["mu"] = np.asarray(mu, dtype=np.float32)
        f["logvar"] = np.asarray(logvar, dtype=np.float32)
        f["selected"] = np.asarray(selected, dtype=bool)
        f.attrs["note"] = "selected: the averages the VAE was trained on (others only encoded)"
        for name, value in (poses or {}).items():
            f[name] = np.asarray(value, dtype=np.float64)
        if poses:
            f.attrs["quaternion_convention"] = ("scalar-first (w, x, y, z), fundamental zone of "
                                                "the point group; refined by the VAE")


def read_latent(path) -> dict:
    """``latent.h5``: ``mu``, ``logvar``, ``selected`` (and the refined poses when present)."""
    with open_input(path, "a latent file") as f:
        out = {key: f[key][()] for key in ("mu", "logvar", "selected")}
        for key in ("quaternion_refined", "pose_change_deg"):
            if key in f:
                out[key] = f[key][()]
    out["selected"] = np.asarray(out["selected"], dtype=bool)
    if out["mu"].ndim != 2 or out["selected"].shape != (out["mu"].shape[0],):
        raise InputError(path, f"mu {out['mu'].shape} and selected {out['selected'].shape} "
                               "do not describe the same averages")
    return out


def write_frame_latent(path, latent, attrs=None, extra=None) -> None:
    """``latent (N, zdim)``, the ``extra`` datasets (name -> (N, zdim)) and the attributes."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f["latent"] = np.asarray(latent, dtype=np.float64)
        for key, value in (extra or {}).items():
            f[key] = np.asarray(value, dtype=np.float64)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value


def read_frame_latent(path, num_frames: int | None = None) -> np.ndarray:
    """``frame_latent.h5``'s ``latent (N, zdim)``; N must be ``num_frames`` when given."""
    with open_input(path, "a frame-latent file") as f:
        if "latent" not in f:
            raise InputError(path, "no 'latent' dataset (vae/frame_latent.h5)")
        latent = f["latent"][()]
    if latent.ndim != 2 or (num_frames is not None and latent.shape[0] != num_frames):
        raise InputError(path, f"latent has shape {latent.shape}, the dataset has "
                               f"{num_frames} frames")
    return latent
