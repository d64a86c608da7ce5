"""Frames shared between class averages: the EMC's own evidence of which averages show one object.

Every frame belongs to the classes of a bootstrap replicate with its EMC occupancies, and a frame
drawn by two replicates belongs to classes of both. Two averages of one structure share frames:
neighbouring orientations and sizes of one particle leave a frame undecided between them, and
the other replicate cuts the same frames into other classes. Two averages of different structures
share almost none, whatever their common lines say: a rod's frame is not explained by a cube's
class.

That is what the common-line landscape misses at a few hundred photons per frame: there a dimer's
or a rod's averages correlate with the cubes' as well as the cubes' among themselves, and k-means
in the CLPCA space puts them in the cube cluster (docs/validation.md, "Landscape clusters and
shared frames").

**Similarity.** Average a's membership vector m_a holds, for every frame, its occupancy of a's
class (0 for frames its replicate did not draw; a frame drawn twice counts twice). The similarity
of a and b is the cosine ``m_a · m_b / (|m_a| |m_b|)``, accumulated over blocks of frames, so
memory is (A, block) whatever the number of frames.

**Splitting a cluster.** The averages of one cluster are a weighted graph with this similarity
on the edges. Its weakest cut is found as in spectral partitioning: a sweep along the Fiedler
vector of the normalised graph Laplacian (disconnected parts directly), keeping the prefix of
least conductance, the cut weight over the smaller side's volume (its total similarity): the
share of the smaller part's frame memberships that it shares with the rest. A cluster whose
weakest cut shares less than ``threshold`` (0.0005 by default) is split in two, and both parts
are checked again. Averages that share no frame with the rest of their cluster give no evidence
and stay in it.

The threshold: on the validation matrix (eight sets, 300-3,000 photons per frame) every cut
between two species inside a common-line cluster shares at most 0.00016 (cubes against dimers
and rods at 308 photons), every cut inside one population at least 0.0013 (dimers at 300
photons) but one: the demo's rods, whose end-on and side-on classes share no frame at 1,500
photons (0.00009, split, which costs the demo's ARI 0.005). 0.0005 is the middle of that gap on
a log scale; every threshold from 0.0003 to 0.001 gives the same clusters on all eight sets.

**Between clusters.** :func:`cluster_shares` gives, for every pair of final clusters, the share
of the smaller one's memberships that lies with the other (``embedding.h5``'s ``shared_frames``).
The VAE's series (cube ... sphere) is one object changing shape: its clusters share frames with
their neighbours along it (0.008-0.21 on the matrix), and a cluster on the series' common-line
axis that shares none with them (``df64``'s spheroids, 10^-11) is another object
(:func:`spiscape.vae.data.auto_clusters`).
"""

from __future__ import annotations

import numpy as np

from spiscape.embed.landscape import kept_classes

#: the default ``threshold`` of :func:`split_clusters` (``spiscape embed --split-shared-frames``)
SPLIT_SHARED_FRAMES = 5e-4


#: frames x averages held at once by :func:`membership_similarity` (64 MB of float64)
BLOCK_ELEMENTS = 8_000_000


def membership_similarity(num_averages: int, reps, replicate_of, class_of, num_frames: int,
                          block: int | None = None) -> np.ndarray:
    """(A, A) cosine similarity of the averages' frame memberships (module docstring).

    ``replicate_of`` and ``class_of`` are averages.h5's ``replicate`` and ``class``; ``reps``
    the replicates (:class:`spiscape.io.replicate.Replicate`) that made them; ``block`` frames
    at a time (default: ``BLOCK_ELEMENTS`` / A).
    """
    block = block or max(1024, BLOCK_ELEMENTS // max(num_averages, 1))
    prepared = []
    for rep in reps:
        rows, classes = kept_classes(rep, replicate_of, class_of)
        if rows.size and rep.frames.size:
            order = np.argsort(rep.frames, kind="stable")
            prepared.append((rep, rows, classes, order, np.asarray(rep.frames)[order]))
    gram = np.zeros((num_averages, num_averages))
    for start in range(0, num_frames, block):
        stop = min(start + block, num_frames)
        member = np.zeros((num_averages, stop - start))
        for rep, rows, classes, order, frames in prepared:
            lo, hi = np.searchsorted(frames, [start, stop])
            if lo == hi:
                continue
            cols = frames[lo:hi] - start
            occ = np.asarray(rep.occupancies[order[lo:hi]], dtype=np.float64)[:, classes]
            for j, row in enumerate(rows):
                member[row] += np.bincount(cols, weights=occ[:, j], minlength=stop - start)
        gram += member @ member.T
    norm = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    outer = np.outer(norm, norm)
    return np.divide(gram, outer, out=np.zeros_like(gram), where=outer > 0)


def weakest_cut(weights: np.ndarray) -> tuple[float, np.ndarray]:
    """``(share, side)``: the least-conductance cut of a graph whose nodes all have an edge
    (``weights`` (n, n) symmetric, >= 0, zero diagonal, n >= 2), and a bool mask of one side.

    Disconnected parts are cut directly (share 0); otherwise the sweep cut along the Fiedler
    vector of the normalised Laplacian.
    """
    from scipy.sparse.csgraph import connected_components, laplacian

    w = np.asarray(weights, dtype=np.float64)
    degree = w.sum(axis=1)
    parts, which = connected_components(w > 0, directed=False)
    if parts > 1:
        volume = np.bincount(which, weights=degree)
        return 0.0, which == int(np.argmax(volume))
    _, vectors = np.linalg.eigh(laplacian(w, normed=True))
    order = np.argsort(vectors[:, 1] / np.sqrt(degree), kind="stable")
    ordered = w[np.ix_(order, order)]
    inside = np.cumsum(degree[order])[:-1]  # volume of the first i + 1 nodes
    within = np.cumsum(np.tril(ordered, -1).sum(axis=1))[:-1]  # edge weight among them
    cut = inside - 2.0 * within
    share = cut / np.minimum(inside, degree.sum() - inside)
    best = int(np.argmin(share))
    side = np.zeros(w.shape[0], dtype=bool)
    side[order[:best + 1]] = True
    return float(max(share[best], 0.0)), side


def graph_weights(similarity: np.ndarray) -> np.ndarray:
    """The similarity as a graph's edge weights: symmetric, >= 0, no self-loops."""
    w = np.clip(np.asarray(similarity, dtype=np.float64), 0.0, None)
    w = (w + w.T) / 2.0
    np.fill_diagonal(w, 0.0)
    return w


def cluster_shares(similarity: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(C, C) for the clusters 0..C-1 of ``labels``: entry (i, j) the similarity between the two
    clusters' averages over the smaller cluster's volume (its averages' similarity to all
    others); 0 where either has none, 1 on the diagonal."""
    w = graph_weights(similarity)
    labels = np.asarray(labels)
    count = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    onehot = np.zeros((labels.size, count))
    inside = labels >= 0
    onehot[np.flatnonzero(inside), labels[inside]] = 1.0
    between = onehot.T @ w @ onehot
    volume = w.sum(axis=1) @ onehot
    smaller = np.minimum(volume[:, None], volume[None, :])
    out = np.divide(between, smaller, out=np.zeros_like(between), where=smaller > 0)
    np.fill_diagonal(out, 1.0)
    return out


def split_clusters(similarity: np.ndarray, labels: np.ndarray,
                   threshold: float = SPLIT_SHARED_FRAMES) -> tuple[np.ndarray, list[dict]]:
    """Split every cluster whose parts share less than ``threshold`` of their frame memberships
    (module docstring); returns the new labels (old numbers kept, new parts numbered after
    them; -1 stays -1) and one record per split: ``cluster`` (the number it came from),
    ``sizes`` (averages on each side) and ``share``."""
    w = graph_weights(similarity)
    out = np.asarray(labels).copy()
    splits: list[dict] = []
    if threshold <= 0:
        return out, splits
    pending = [np.flatnonzero(out == c) for c in np.unique(out[out >= 0])]
    following = int(out.max()) + 1 if out.size else 0
    while pending:
        members = pending.pop()
        linked = members[w[np.ix_(members, members)].sum(axis=1) > 0]
        if linked.size < 2:
            continue
        share, side = weakest_cut(w[np.ix_(linked, linked)])
        if share >= threshold:
            continue
        part = linked[side] if side.sum() <= (~side).sum() else linked[~side]
        splits.append({"cluster": int(out[part[0]]), "sizes": [int(members.size - part.size),
                                                               int(part.size)],
                       "share": share})
        out[part] = following
        following += 1
        pending += [np.setdiff1d(members, part), part]
    return out, splits
