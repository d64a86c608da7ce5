"""Low-dimensional embedding of the common-line similarity matrix (the "CLPCA space").

Each 2D class average is described by its row of the common-line correlation matrix: how well it
shares a common line with every other average. Averages of the same 3D object share common lines
with the same partners, so their rows are alike. Principal component analysis of the centred
rows (Zhuang, Ayyer et al., IUCrJ 2022) gives the CLPCA coordinates; the first components order
the averages by structure (cube ... sphere) and set the contaminants apart. Non-linear
alternatives are offered for exploration: Isomap, spectral embedding (of the rows'
nearest-neighbour graph), t-SNE and UMAP (optional package ``umap-learn``) of the same rows.

By default the correlations are first put through Fisher's z-transform, ``z = artanh(cc)``. The
common-line correlations of class averages all lie close to 1 (every average shares the steep
radial fall-off of the intensity), where a difference of 0.005 in ``cc`` is as significant as one
of 0.1 near 0.5: the sampling spread of a correlation shrinks as ``1 - cc^2``. The transform makes
those differences comparable, and the embedding then separates the populations far better (on
the default simulated dataset: adjusted Rand index of the frames' clusters 0.90 against 0.67
without it, same clustering). The diagonal (``cc = 1``, ``z`` infinite) is set to the largest
off-diagonal ``z``, so that an average's self-similarity does not dominate its row.
``cc_transform="none"`` gives the paper's CLPCA of the raw correlations.

Noise correction (``noise_neighbours`` k > 0, the CLI's default 5). Any two central slices of one
3D intensity share a line exactly, so the common-line CC of two averages of one structure would be
1 without noise; noise lowers it to about ``sqrt(R_i R_j)``, ``R`` each average's reliability (the
signal's share of its variance; Spearman's attenuation). An average merged from few frames (or
few photons) therefore correlates less with everything, and without a correction the noise level
becomes a direction of the embedding: on the validation matrix the sphere averages' first
components follow their frame counts (Spearman |rho| 0.7-0.9 on five of eight sets), which
splits populations by how many frames their classes drew. The correction estimates
``a_i = log(R_i) / 2`` by least squares from ``log cc_ij = a_i + a_j`` over each average's k best
partners (assumed to be of its own structure; k is capped at a tenth of the averages, at least
1, so that a small set's partners do not cross species), caps ``a <= 0``, and divides ``cc_ij`` by
``exp(a_i + a_j)`` (clipped below 1). The reliabilities ``R`` are written to embedding.h5.

Readers of the stage inputs (``commonlines.h5``, ``averages.h5``) live here too, each checking
what the embedding relies on and naming the file when it is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spiscape.errors import ConfigError

METHODS = ("pca", "isomap", "spectral", "tsne", "umap")
CC_TRANSFORMS = ("fisher", "none")


@dataclass
class Embedding:
    """Coordinates ``(A, k)`` of the averages, with what the method reports about them.

    ``explained_variance`` is the variance along each principal axis for PCA; for the other
    methods (which have no such notion) it is the variance of each coordinate, and
    ``explained_variance_ratio`` is that over the total variance of the rows (PCA) or over the sum
    of the coordinates' variances (others).
    """

    coords: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    method: str
    params: dict = field(default_factory=dict)


def transform_cc(cc: np.ndarray, transform: str = "fisher") -> np.ndarray:
    """The matrix whose rows are embedded: Fisher z of the correlations, or them unchanged."""
    if transform not in CC_TRANSFORMS:
        raise ConfigError(f"unknown cc transform '{transform}'; choose from "
                          f"{', '.join(CC_TRANSFORMS)}")
    cc = np.asarray(cc, dtype=np.float64)
    if transform == "none":
        return cc
    limit = 1.0 - 1e-6
    z = np.arctanh(np.clip(cc, -limit, limit))
    off = ~np.eye(cc.shape[0], dtype=bool)
    np.fill_diagonal(z, z[off].max() if off.any() else np.arctanh(limit))
    return z


#: partners per average of the noise correction in the CLI and the workflow (embed() alone
#: applies none): the 2D EMC draws tens of classes per population, so an average's 5 best
#: partners are of its own structure
NOISE_NEIGHBOURS = 5
#: at most one partner per this many averages (a tenth of them)
PARTNER_SHARE_DIVISOR = 10
#: corrected correlations are clipped below this (Fisher z stays finite)
MAX_CORRECTED_CC = 0.999


def disattenuate(cc: np.ndarray, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """The noise-corrected matrix and each average's reliability ``R (A,)`` (module docstring).

    ``neighbours`` 0 returns ``cc`` unchanged and R = 1.
    """
    cc = np.asarray(cc, dtype=np.float64)
    count = cc.shape[0]
    if neighbours <= 0:
        return cc, np.ones(count)
    import scipy.sparse as sp
    from scipy.sparse.linalg import lsqr

    # each average's partners must be of its own structure: with few averages, fewer partners
    # (a species of a tenth of the averages still fills them)
    k = max(1, min(int(neighbours), count // PARTNER_SHARE_DIVISOR, count - 1))
    off = cc.copy()
    np.fill_diagonal(off, -np.inf)
    partners = np.argsort(-off, axis=1, kind="stable")[:, :k]
    rows = np.repeat(np.arange(count), k)
    cols = partners.ravel()
    target = np.log(np.clip(cc[rows, cols], 1e-3, 1.0))
    eq = np.arange(rows.size)
    design = sp.csr_matrix((np.ones(2 * rows.size), (np.concatenate([eq, eq]),
                                                      np.concatenate([rows, cols]))),
                           shape=(rows.size, count))
    half_log = np.minimum(lsqr(design, target, atol=1e-12, btol=1e-12)[0], 0.0)
    out = cc * np.exp(-half_log[:, None] - half_log[None, :])
    out = np.clip(out, -MAX_CORRECTED_CC, MAX_CORRECTED_CC)
    np.fill_diagonal(out, 1.0)
    return out, np.exp(2.0 * half_log)


def _orient_signs(coords: np.ndarray) -> np.ndarray:
    """Fix each axis's arbitrary sign: the coordinate of largest magnitude is positive."""
    big = np.argmax(np.abs(coords), axis=0)
    signs = np.sign(coords[big, np.arange(coords.shape[1])])
    return coords * np.where(signs == 0, 1.0, signs)


def clpca(cc: np.ndarray, components: int = 3) -> Embedding:
    """PCA of the centred rows of the common-line matrix (the paper's CLPCA space)."""
    rows = np.asarray(cc, dtype=np.float64)
    centred = rows - rows.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    variance = s**2 / max(rows.shape[0] - 1, 1)
    coords = _orient_signs(u[:, :components] * s[:components])
    total = variance.sum()
    ratio = variance[:components] / total if total > 0 else np.zeros(components)
    return Embedding(coords, variance[:components], ratio, "pca")


def _check(cc: np.ndarray, method: str, components: int) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown embedding method '{method}'; choose from {', '.join(METHODS)}")
    if not 1 <= components < cc.shape[0]:
        raise ConfigError(f"{components} components asked from {cc.shape[0]} averages; "
                          f"choose 1 to {cc.shape[0] - 1}")


def embed(cc, method: str = "pca", components: int = 3, seed: int = 1,
          neighbors: int | None = None, perplexity: float | None = None,
          cc_transform: str = "fisher", noise_neighbours: int = 0) -> Embedding:
    """Embed the averages described by the common-line matrix ``cc (A, A)``.

    ``cc_transform``: "fisher" (default) or "none"; ``noise_neighbours``: the noise correction's
    partners per average (0: none); see the module docstring. The reliabilities are returned in
    ``params["reliability"]`` when the correction is on. ``neighbors``
    (Isomap, spectral, UMAP) defaults to about ``sqrt(A)``, at least 5; ``perplexity`` (t-SNE)
    to ``min(30, (A - 1) / 3)``.
    """
    raw = np.asarray(cc, dtype=np.float64)
    _check(raw, method, components)
    corrected, reliability = disattenuate(raw, noise_neighbours)
    cc = transform_cc(corrected, cc_transform)
    extra = {"noise_neighbours": int(noise_neighbours)}
    if noise_neighbours > 0:
        extra["reliability"] = reliability
    if method == "pca":
        result = clpca(cc, components)
        result.params = {"cc_transform": cc_transform, **extra}
        return result
    count = cc.shape[0]
    k = neighbors or max(5, int(round(np.sqrt(count))))
    k = min(k, count - 1)
    params: dict = {"neighbors": k, "cc_transform": cc_transform}
    if method == "isomap":
        from sklearn.manifold import Isomap

        coords = Isomap(n_neighbors=k, n_components=components).fit_transform(cc)
    elif method == "spectral":
        from sklearn.manifold import SpectralEmbedding

        coords = SpectralEmbedding(n_components=components, affinity="nearest_neighbors",
                                   n_neighbors=k, random_state=seed).fit_transform(cc)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        perp = perplexity or min(30.0, (count - 1) / 3.0)
        params = {"perplexity": perp, "cc_transform": cc_transform}
        coords = TSNE(n_components=components, perplexity=perp, random_state=seed, init="pca",
                      method="exact" if components > 3 else "barnes_hut").fit_transform(cc)
    else:
        try:
            import umap
        except ImportError:
            raise ConfigError("--method umap needs the optional package umap-learn "
                              "(pip install umap-learn)") from None
        coords = umap.UMAP(n_components=components, n_neighbors=k,
                           random_state=seed).fit_transform(cc)
    coords = _orient_signs(np.asarray(coords, dtype=np.float64))
    variance = coords.var(axis=0, ddof=1)
    total = variance.sum()
    return Embedding(coords, variance, variance / total if total > 0 else variance, method,
                     {**params, **extra})
