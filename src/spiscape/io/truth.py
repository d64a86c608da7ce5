"""The ground truth of a simulated dataset, ``truth.h5``.

Format
------
Per frame (shape ``(num_frames,)`` unless said):

``label``             int8, population: 0 cube, 1 melting, 2 sphere, 3 dimer, 4 rod (names in the
                      attribute ``label_names``, a JSON list indexed by label)
``t``                 f8, melting parameter: 0 cubes, the cached level for melting particles,
                      1 spheres, NaN for contaminants (dimers, rods)
``quaternion``        f8 ``(num_frames, 4)``, scalar first (w, x, y, z), w >= 0; frame d samples
                      the intensity at R_d q_t (the rotation acts on the detector's q vectors)
``scale``             f8, incident fluence factor phi_d (mean 1)
``size``              f8, size factor s_d of the particle (1 = nominal; contaminants 1)
``shape_index``       int16, index into ``volumes/``
``photons``           int32, photons recorded in the frame (background included)
``expected_photons``  f8, the frame's expected photon count (sum of its Poisson means)

``volumes/intens``    f4 ``(K, N, N, N)`` gzip, noiseless intensity of each shape at s = 1 in
                      expected photons per pixel at phi = 1 and corr = 1, centred on voxel N // 2
                      (``intens[k, i, j, l]`` is at q = (i, j, l) - N // 2 voxels); frame d's
                      expected counts are ``scale_d size_d^6 intens[k](size_d R_d q_t) corr_t``
                      plus the detector's background
``volumes/label``     int8 ``(K,)``, ``volumes/t`` f8 ``(K,)``,
``volumes/particle_volume_nm3`` f8 ``(K,)``, ``volumes/exponent`` f8 ``(K,)`` (superball p, NaN
                      for shapes that are not superballs)

Root attributes: ``label_names`` (JSON), ``wavelength_nm``, ``detector_distance_mm``,
``detector_distance_px``, ``pixel_um`` (physical), ``binning``, ``pixel_size_um`` (binned),
``voxel_size_nm``, ``q_per_voxel_inv_nm``, ``grid_size``, ``grid_centre``, ``seed``,
``mean_photons``, ``intensity_scale`` and ``params`` (JSON of every simulation parameter).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.io.hdf5 import open_input, plain_attr
from spiscape.utils.atomic import atomic_path

FRAME_FIELDS = {
    "label": np.int8,
    "t": np.float64,
    "quaternion": np.float64,
    "scale": np.float64,
    "size": np.float64,
    "shape_index": np.int16,
    "photons": np.int32,
    "expected_photons": np.float64,
}
VOLUME_FIELDS = {
    "label": np.int8,
    "t": np.float64,
    "particle_volume_nm3": np.float64,
    "exponent": np.float64,
}


@dataclass
class Truth:
    """Contents of truth.h5; ``volumes`` is None when read with ``volumes=False``."""

    frames: dict[str, np.ndarray]
    volume_info: dict[str, np.ndarray]
    attrs: dict
    volumes: np.ndarray | None = None
    label_names: list[str] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        return int(self.frames["label"].shape[0])

    def __getattr__(self, name):
        frames = self.__dict__.get("frames", {})
        if name in frames:
            return frames[name]
        raise AttributeError(name)


def write_truth(
    path: str | os.PathLike,
    frames: dict[str, np.ndarray],
    volumes,
    volume_info: dict[str, np.ndarray],
    attrs: dict,
) -> None:
    """Write truth.h5 atomically (layout in the module docstring); volumes: a sequence of N^3."""
    missing = set(FRAME_FIELDS) - set(frames)
    if missing:
        raise ValueError(f"truth frames lack {sorted(missing)}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=False) as f:
        for name, dtype in FRAME_FIELDS.items():
            f.create_dataset(name, data=np.asarray(frames[name], dtype=dtype), track_times=False)
        grp = f.create_group("volumes")
        shape = (len(volumes),) + tuple(np.shape(volumes[0]))
        dset = grp.create_dataset(
            "intens",
            shape=shape,
            dtype=np.float32,
            chunks=(1,) + shape[1:],
            compression="gzip",
            compression_opts=4,
            shuffle=True,
            track_times=False,
        )
        for k, volume in enumerate(volumes):  # one at a time: no stacked copy in memory
            dset[k] = np.asarray(volume, dtype=np.float32)
        for name, dtype in VOLUME_FIELDS.items():
            grp.create_dataset(name, data=np.asarray(volume_info[name], dtype=dtype),
                               track_times=False)
        for key, value in attrs.items():
            f.attrs[key] = value


def read_truth(path: str | os.PathLike, volumes: bool = True) -> Truth:
    """Read truth.h5; InputError when it is missing or lacks a field."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    try:
        with h5py.File(path, "r") as f:
            frames = {name: f[name][()] for name in FRAME_FIELDS}
            info = {name: f["volumes"][name][()] for name in VOLUME_FIELDS}
            vol = f["volumes/intens"][()] if volumes else None
            attrs = {key: plain_attr(value) for key, value in f.attrs.items()}
    except KeyError as exc:
        raise InputError(path, f"not a spiscape truth file (missing {exc})") from None
    except OSError as exc:
        raise InputError(path, f"unreadable truth file ({exc})") from None
    names = json.loads(attrs.get("label_names", "[]"))
    return Truth(frames=frames, volume_info=info, attrs=attrs, volumes=vol, label_names=names)


def read_q_per_voxel(path: str | os.PathLike) -> float:
    """The q step (1/nm per voxel of the 3D grid, per pixel at the detector centre) of truth.h5."""
    with open_input(path, "a spiscape truth file") as f:
        value = f.attrs.get("q_per_voxel_inv_nm")
    if value is None:
        raise InputError(path, "no attribute 'q_per_voxel_inv_nm' (not a spiscape truth.h5)")
    return float(value)
