"""``embedding.h5``: the landscape of the class averages (written by ``spiscape embed``; read by
landscape, embed-new, vae ``--clusters``).

Layout (HDF5), one row per average of ``averages.h5`` in its order:

- ``coords (A, k)`` float64: the embedding (CLPCA by default), each axis's sign fixed so that its
  largest coordinate is positive; ``labels (A,)`` int: the cluster of each average (-1: outlier);
- ``explained_variance (k,)``, ``explained_variance_ratio (k,)``; ``centroids (C, k)``;
- ``replicate (A,)``, ``class (A,)``: as in ``averages.h5``;
- ``reliability (A,)`` float64 (optional): each average's reliability from the noise correction
  (``spiscape.embed.embedding.disattenuate``), when it was on;
- ``shared_frames (C, C)`` float64 (optional, since 2026-12-07): for each pair of clusters the
  share of the smaller one's frame memberships that lies with the other
  (``spiscape.embed.sharing.cluster_shares``), with attribute ``split_shared_frames`` (the
  threshold below which two clusters are different objects); written by ``spiscape embed`` with
  ``--replicates`` and the split on, read by vae ``--clusters auto``;
- with a truth: ``truth_label (A,)``, ``truth_t (A,)`` and attribute ``label_names`` (JSON);
- attributes: ``method``, ``method_params`` (JSON), ``cc_transform``, ``components``,
  ``cluster_method``, ``num_clusters``, ``seed``, ``commonlines``, ``averages``, ``model``,
  ``metrics`` (JSON).

``spiscape embed-new`` writes the same ``coords``, ``labels``, ``replicate`` and ``class`` for
averages placed by the regressor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.io.hdf5 import open_input, plain_attr
from spiscape.utils.atomic import atomic_path


@dataclass
class EmbeddingFile:
    coords: np.ndarray  # (A, k)
    labels: np.ndarray  # (A,)
    method: str = "pca"
    explained_variance_ratio: np.ndarray | None = None  # (k,), None for embed-new's files
    attrs: dict = field(default_factory=dict)
    shared_frames: np.ndarray | None = None  # (C, C), None where embed did not measure it
    path: str = ""


def read_embedding(path, count: int | None = None) -> EmbeddingFile:
    """``embedding.h5``, validated: coordinates and labels of one length (``count`` when given:
    the averages'), finite coordinates."""
    with open_input(path, "an embedding file") as f:
        coords = np.asarray(f["coords"][()], dtype=np.float64)
        labels = f["labels"][()]
        ratio = f["explained_variance_ratio"][()] if "explained_variance_ratio" in f else None
        shared = f["shared_frames"][()] if "shared_frames" in f else None
        attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
    if coords.ndim != 2 or labels.shape != (coords.shape[0],):
        raise InputError(path, f"coords {coords.shape} and labels {labels.shape} do not match")
    if count is not None and coords.shape[0] != count:
        raise InputError(path, f"{coords.shape[0]} averages embedded, {count} expected")
    if not np.all(np.isfinite(coords)):
        raise InputError(path, "coords hold NaN or infinite values")
    clusters = int(labels.max()) + 1 if labels.size else 0
    if shared is not None and (shared.shape != (clusters, clusters)
                               or not np.all(np.isfinite(shared))):
        raise InputError(path, f"shared_frames {shared.shape} does not match the {clusters} "
                               f"clusters of labels, or holds NaN")
    return EmbeddingFile(coords=coords, labels=labels, method=str(attrs.get("method", "pca")),
                         explained_variance_ratio=ratio, attrs=attrs, path=str(path),
                         shared_frames=shared)


def write_embedding(path, datasets: dict, attrs: dict) -> None:
    """Write ``embedding.h5`` atomically: ``coords`` and ``labels`` and whatever else of the
    layout the writer has, in the order given, then the attributes."""
    for key in ("coords", "labels"):
        if key not in datasets:
            raise ValueError(f"embedding datasets: {key} missing")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key, value in datasets.items():
            f[key] = value
        for key, value in attrs.items():
            f.attrs[key] = value
