"""Groups of averages in the embedding: k-means, Gaussian mixture or density-based clustering.

The number of groups comes from the config or is chosen from the data: the k of best mean
silhouette for k-means, of lowest BIC for a Gaussian mixture; DBSCAN and HDBSCAN find it
themselves and mark outliers -1. Cluster numbers are ordered by size (0 the most populated) so
that they do not depend on the algorithm's internal order; every random choice takes the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spiscape.errors import ConfigError

METHODS = ("kmeans", "gmm", "dbscan", "hdbscan")


@dataclass
class Clustering:
    labels: np.ndarray
    num_clusters: int
    method: str
    scores: dict = field(default_factory=dict)  # k -> silhouette (k-means) or BIC (GMM)


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0.. by decreasing size (ties: by first appearance); -1 stays -1."""
    labels = np.asarray(labels)
    found = [c for c in dict.fromkeys(labels.tolist()) if c >= 0]
    order = sorted(found, key=lambda c: -int(np.sum(labels == c)))
    out = np.full(labels.shape, -1, dtype=np.int64)
    for new, old in enumerate(order):
        out[labels == old] = new
    return out


def _kmeans(coords, k, seed):
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(coords)


def _gmm(coords, k, seed):
    from sklearn.mixture import GaussianMixture

    model = GaussianMixture(n_components=k, covariance_type="full", n_init=3,
                            random_state=seed, reg_covar=1e-6 * max(coords.var(), 1e-12))
    model.fit(coords)
    return model.predict(coords), model.bic(coords)


def candidate_counts(count: int, max_clusters: int) -> range:
    return range(2, max(2, min(max_clusters, count - 1)) + 1)


def cluster(coords, method: str = "kmeans", num_clusters: int | str = "auto", seed: int = 1,
            max_clusters: int = 8, eps: float | None = None,
            min_samples: int | None = None) -> Clustering:
    """Cluster the rows of ``coords (A, k)``; see the module docstring for the methods."""
    coords = np.asarray(coords, dtype=np.float64)
    count = coords.shape[0]
    if method not in METHODS:
        raise ConfigError(f"unknown clustering method '{method}'; choose from {', '.join(METHODS)}")
    auto = isinstance(num_clusters, str)
    if auto and num_clusters != "auto":
        raise ConfigError(f"number of clusters must be an integer or 'auto', not {num_clusters!r}")
    if not auto and method in ("kmeans", "gmm") and not 1 <= int(num_clusters) <= count:
        raise ConfigError(f"{num_clusters} clusters asked of {count} averages")
    scores: dict = {}
    if method == "kmeans":
        if auto:
            from sklearn.metrics import silhouette_score

            for k in candidate_counts(count, max_clusters):
                labels = _kmeans(coords, k, seed)
                scores[k] = float(silhouette_score(coords, labels)) if len(set(labels)) > 1 \
                    else -1.0
            best = max(scores, key=scores.get)
        else:
            best = int(num_clusters)
        labels = _kmeans(coords, best, seed)
    elif method == "gmm":
        if auto:
            fits = {k: _gmm(coords, k, seed) for k in range(1, max(1, min(max_clusters,
                                                                            count - 1)) + 1)}
            scores = {k: float(bic) for k, (_, bic) in fits.items()}
            best = min(scores, key=scores.get)
            labels = fits[best][0]
        else:
            labels, _ = _gmm(coords, int(num_clusters), seed)
    elif method == "dbscan":
        from sklearn.cluster import DBSCAN
        from sklearn.neighbors import NearestNeighbors

        samples = min_samples or max(3, coords.shape[1] + 1)
        samples = min(samples, count)
        if eps is None:
            # the median distance to the min_samples-th neighbour: a scale-free default
            dist, _ = NearestNeighbors(n_neighbors=samples).fit(coords).kneighbors(coords)
            eps = float(np.median(dist[:, -1])) * 1.5 or 1e-9
        labels = DBSCAN(eps=eps, min_samples=samples).fit_predict(coords)
        scores = {"eps": eps, "min_samples": samples}
    else:
        from sklearn.cluster import HDBSCAN

        samples = min(min_samples or max(3, coords.shape[1] + 1), count)
        labels = HDBSCAN(min_cluster_size=samples, copy=True).fit_predict(coords)
        scores = {"min_cluster_size": samples}
    labels = relabel_by_size(labels)
    return Clustering(labels, int(labels.max() + 1) if labels.size else 0, method, scores)


def centroids(coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean coordinates of each cluster ``(C, k)`` (outliers, label -1, left out)."""
    count = int(labels.max() + 1) if labels.size and labels.max() >= 0 else 0
    return np.array([coords[labels == c].mean(axis=0) for c in range(count)]).reshape(
        count, coords.shape[1])


def nearest_cluster(coords: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """The cluster whose centroid is nearest to each row of ``coords`` (-1 when none exist)."""
    if centres.shape[0] == 0:
        return np.full(coords.shape[0], -1, dtype=np.int64)
    dist = ((coords[:, None, :] - centres[None]) ** 2).sum(axis=2)
    return dist.argmin(axis=1).astype(np.int64)
