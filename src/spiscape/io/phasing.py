"""The phasing files (written by ``spiscape phase``; read by the health checks and the summary).

``phasing.h5``, one row per phased pattern: ``density (K, V, V, V)`` or (K, S, S) (gzip), the
real-space density of the averaged starts; ``support`` (gzip) its support; ``volume (K,)`` nm³
(3D; Porod volume by default, see ``volume_rule``) or ``area (K,)`` (2D); ``prtf (K, Q)`` and
``prtf_q (Q,)``, the phase-retrieval transfer function over the starts; ``resolution_nm (K,)``
where it falls below 1/e (NaN where it never does); ``z (K, zdim)`` the latent points;
``index (K,)`` which volumes of the input; ``error (K, iterations)`` the mean support error;
(NaN-padded where patterns ran different recipes); ``converged (K,)`` bool, at least
``min_agree`` starts agreed (``nn+refine``: the refined density agrees with the network's
prediction); ``starts_averaged (K,)``; ``method (K,)`` bytes, how each pattern was phased
(``iterative``, ``nn``, ``nn+refine``; absent in files written before 2026-12-06);
attributes ``method`` (the run's), ``refine_recipe``, ``phaser_model`` (path, "" for
iterative), ``phaser_sha256``, ``recipe``, ``starts``, ``seed``, ``volume_rule``,
``threshold_fraction``,
``voxel_size_nm``, ``q_per_voxel_inv_nm``, ``q_min_voxels``, ``q_max_voxels``,
``smoothing_voxels``, ``mode`` ("3d"/"2d"), ``source``, ``params`` (JSON),
``seconds_per_pattern``, ``porod_envelope_s2`` (voxels⁻², the Porod rule's envelope shared by
the file's patterns, NaN for other rules; absent in files written before 2026-12-07).

``volume_curve.csv``: the volume along the latent, one row per pattern (see
:func:`write_curve`).
"""

from __future__ import annotations

import csv

import h5py
import numpy as np

from spiscape.io.hdf5 import open_input
from spiscape.utils.atomic import atomic_path

#: stored compressed
COMPRESSED = {"density": {"compression": "gzip", "shuffle": True},
              "support": {"compression": "gzip"}}


def write_phasing(path, datasets: dict, attrs: dict) -> None:
    """Write ``phasing.h5`` atomically, datasets in the order given, then the attributes."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value, **COMPRESSED.get(key, {}))
        for key, value in attrs.items():
            f.attrs[key] = value


def read_converged(path) -> np.ndarray | None:
    """``converged (K,)`` of a ``phasing.h5`` (None for a file written before it existed)."""
    with open_input(path, "a phasing file") as f:
        return np.asarray(f["converged"][()], dtype=bool) if "converged" in f else None


def read_phased_volumes(path) -> tuple[np.ndarray, np.ndarray] | None:
    """``volume (K,)`` and ``converged (K,)`` of a 3D ``phasing.h5`` (None for a 2D one or a
    file without them)."""
    with open_input(path, "a phasing file") as f:
        if "volume" not in f or "converged" not in f:
            return None
        return (np.asarray(f["volume"][()], dtype=np.float64),
                np.asarray(f["converged"][()], dtype=bool))


def write_curve(path, idx, z, volumes, resolution, has_data, converged):
    """volume_curve.csv: index, z0..z{d-1}, volume_nm3, volume_relative (to the first), PRTF
    resolution, has_data (1: an average's latent lies within a grid step of the point; 0: the
    decoder's extrapolation between or beyond the data), converged (1: at least --min-agree
    phasing starts agreed; 0: the volume rests on one start and may be an outlier)."""
    first = volumes[0] if volumes.size and volumes[0] > 0 else np.nan
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index"] + [f"z{j}" for j in range(z.shape[1])]
                        + ["volume_nm3", "volume_relative", "prtf_resolution_nm", "has_data",
                           "converged"])
        for k, i in enumerate(idx):
            writer.writerow([i] + [f"{v:.6g}" for v in z[k]]
                            + [f"{volumes[k]:.6g}", f"{volumes[k] / first:.6g}",
                               f"{resolution[k]:.4g}", int(bool(has_data[k])),
                               int(bool(converged[k]))])
