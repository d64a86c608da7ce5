"""Inputs of the VAE: averages, orientations, cluster selection and the radial normalisation.

The encoder sees each average divided by its gain and by the dataset's radial mean intensity
profile (the mean over all averages of the measured pixels in |q| shells), then log(x + 0.1):
diffraction falls off by orders of magnitude with q, and without this the CNN would only see the
few central pixels. The decoder starts from the same profile (see model.Decoder).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from spiscape.errors import ConfigError, InputError
from spiscape.io.averages import read_averages
from spiscape.io.embedding import read_embedding
from spiscape.io.orientation import read_orientation

log = logging.getLogger(__name__)

LOG_FLOOR = 0.1


@dataclass
class VAEData:
    intens: np.ndarray        # (A, S, S) photons per pixel
    support: np.ndarray       # (S, S) bool, measured grid points
    quaternion: np.ndarray    # (A, 4) scalar first
    gain: np.ndarray          # (A,)
    replicate: np.ndarray     # (A,)
    klass: np.ndarray         # (A,)
    frames: np.ndarray        # (A,)
    selected: np.ndarray      # (A,) bool, averages the VAE trains on
    log_scale: np.ndarray | None = None  # (A,) log size against its population's, or None
    labels: np.ndarray | None = None     # (A,) the embedding's clusters, when read


def read_inputs(averages, orientation, embedding=None, clusters="all",
                min_cluster_fraction: float = 0.01, max_detour: float = 1.25) -> VAEData:
    """Read averages.h5 + orientation.h5 (+ embedding.h5 labels and coordinates for a cluster
    selection: ``clusters`` "all", "auto" (see :func:`auto_clusters`) or cluster numbers)."""
    av = read_averages(averages)
    intens = av.intens.astype(np.float32)
    A = av.count
    support = av.support
    # unit quaternions with w >= 0 (q and -q are one rotation: the encoder sees one of them)
    ori = read_orientation(orientation, count=A)
    quat, gain = ori.quaternion, ori.gain
    frames = np.where(np.isfinite(av.frames), av.frames, 1.0).astype(np.float64)
    selected = np.ones(A, dtype=bool)
    emb = labels = None
    if embedding is not None:
        emb = read_embedding(embedding, count=A)
        labels = np.asarray(emb.labels)
    if clusters not in (None, "all", ["all"]):
        if embedding is None:
            raise ConfigError(f"--clusters {clusters!r} needs --embedding (its cluster labels)")
        auto = clusters in ("auto", ["auto"])
        if auto:
            wanted = auto_clusters(labels, frames, min_cluster_fraction, emb.coords,
                                   max_detour, emb.shared_frames,
                                   float(emb.attrs.get("split_shared_frames", 0.0)))
        else:
            wanted = parse_clusters(clusters)
        selected = np.isin(labels, wanted)
        if not selected.any():
            raise ConfigError(f"no average is in the clusters {wanted}")
    return VAEData(
        intens=intens, support=support, quaternion=quat, gain=gain,
        replicate=np.asarray(av.replicate, dtype=np.int64),
        klass=np.asarray(av.klass, dtype=np.int64),
        frames=frames, selected=selected, labels=labels,
    )


def main_axis(coords, labels, weights, max_detour: float) -> list[int]:
    """The clusters on the landscape's main axis, a structural series (cube ... sphere) that the
    VAE's latent spans. Its ends are the two clusters that hold the most frames (``weights`` per
    average): the series' end states, which a sample of one particle in two states and the
    shapes between them holds most of. A cluster c is on the axis when its centroid lies near
    the segment between the ends' a and b, ``(|a - c| + |c - b|) / |a - b| <= max_detour``. A
    contaminant species (dimers, rods, spheroids) lies off to the side of the series and is left
    out, however near it is. It fails when a contaminant holds more frames than one end of the
    series (then it is an end).

    Why not the gap to the nearest cluster (the rule until 2026-12-06): once the landscape no
    longer splits a population by size or noise level, each species is one tight cluster, and
    the gaps between the pieces of the series (cube, melting, sphere: 2-25 median spacings on the
    validation matrix) overlap the contaminants' (8-30); the centroids' detours do not (series
    1.00-1.13, contaminants 1.33-3.8). Outliers (label -1) are never kept."""
    labels = np.asarray(labels)
    coords = np.asarray(coords, dtype=np.float64).reshape(len(labels), -1)
    ids = [int(c) for c in np.unique(labels) if c >= 0]
    if len(ids) <= 2:
        return ids
    centres = np.array([coords[labels == c].mean(axis=0) for c in ids])
    mass = np.array([weights[labels == c].sum() for c in ids])
    a, b = np.argsort(-mass, kind="stable")[:2]
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    if dist[a, b] <= 0:
        return [ids[a], ids[b]]
    on = (dist[a] + dist[b]) / dist[a, b] <= max_detour
    on[[a, b]] = True
    return [c for c, keep in zip(ids, on, strict=True) if keep]


def auto_clusters(labels: np.ndarray, frames: np.ndarray, min_fraction: float,
                  coords: np.ndarray | None = None, max_detour: float = 1.25,
                  shares: np.ndarray | None = None, min_share: float = 0.0) -> list[int]:
    """The clusters that make up the sample's main series: those on the landscape's main axis
    (:func:`main_axis`, detour <= ``max_detour``, when ``coords`` are given) that hold at least
    ``min_fraction`` of the frames (the frame counts of their averages; a floor against
    near-empty noise clusters) and, with ``shares`` (embedding.h5's ``shared_frames``), are
    linked to the series' ends by shared frames (:func:`linked_to_ends`).

    Why not "the big clusters": a population with a size spread could split into several
    clusters, each small, and a melting series is cut into pieces; a size rule left the VAE with
    the cube cluster alone on such data. A contaminant species (dimers, rods) is a different
    object, off the series. Negative labels (outliers of the clustering) are never kept."""
    labels = np.asarray(labels)
    frames = np.where(np.isfinite(frames) & (frames > 0), frames, 0.0)
    total = frames.sum() if frames.sum() > 0 else float(labels.size)
    weights = frames if frames.sum() > 0 else np.ones(labels.size)
    linked = (main_axis(coords, labels, weights, max_detour) if coords is not None
              else [int(c) for c in np.unique(labels) if c >= 0])
    if shares is not None and min_share > 0:
        linked = linked_to_ends(linked, labels, weights, shares, min_share)
    keep = [c for c in linked if weights[labels == c].sum() / total >= min_fraction]
    if not keep:
        raise ConfigError(f"--clusters auto: no cluster of the landscape's main axis holds "
                          f"{min_fraction:.0%} of the frames")
    return keep


def linked_to_ends(clusters: list[int], labels: np.ndarray, weights: np.ndarray,
                   shares: np.ndarray, min_share: float) -> list[int]:
    """The ``clusters`` (on the main axis) that shared frames link to its ends, the two of them
    holding the most frames: a path between clusters that share at least ``min_share`` of the
    smaller one's frame memberships (``spiscape.embed.sharing``). A structural series is one
    object changing shape and its clusters share frames with their neighbours along it (0.008
    to 0.21 on the validation matrix); a cluster on the axis that shares none is another object
    that the common lines place there (``df64``'s spheroids). When the ends themselves are not
    linked (two states without intermediates) the frames say nothing, and every cluster stays."""
    from scipy.sparse.csgraph import connected_components

    if len(clusters) <= 2:
        return list(clusters)
    ids = np.asarray(clusters)
    mass = np.array([weights[labels == c].sum() for c in ids])
    ends = np.argsort(-mass, kind="stable")[:2]
    _, part = connected_components(np.asarray(shares)[np.ix_(ids, ids)] >= min_share,
                                   directed=False)
    if part[ends[0]] != part[ends[1]]:
        log.info("--clusters auto: the series' ends (clusters %d, %d) share no frames; every "
                 "cluster on the axis is kept", ids[ends[0]], ids[ends[1]])
        return list(clusters)
    keep = [int(c) for c, p in zip(ids, part, strict=True) if p == part[ends[0]]]
    left = [int(c) for c in ids if c not in keep]
    if left:
        log.info("--clusters auto: cluster(s) %s on the main axis share less than %g of their "
                 "frames with the series: another object, left out", left, min_share)
    return keep


def size_offsets(scales: np.ndarray, groups: np.ndarray, selected: np.ndarray,
                 frames: np.ndarray) -> np.ndarray:
    """Per-average log size against its population's, from the common lines' size search: the
    VAE slices average i's volume at exp(d_i) R q, so that a population's size spread is not
    carried by the latent (0 for averages not ``selected``; all 0 without a size search).

    ``scales[i, j]`` is the radial scale of j's lines that best matched i's, so j's size
    relative to i's is 1 / scales[i, j] and log(size_i / size_j) = log scales[i, j]. The
    population of i is its group (the landscape's cluster, ``groups``) among the ``selected``
    averages; d_i is the frame-weighted mean of log scales[i, j] over it: i's log size against
    the population's frame-weighted geometric mean size. All of a population's averages then
    see one volume, at that mean size; sizes that differ between clusters (a melt that changes
    the volume, cut into clusters along the series) stay in the latent.

    Why the cluster and not the averages that correlate best with i (tried first): on the
    validation matrix the 2D EMC cuts a sphere population with a 6 % spread into a few large
    classes of the large spheres and some thirty small ones of the small spheres, and a small
    one's best partners are other small ones, so the correction caught 0.44 of the spread
    (regression slope against the truth) and left the mean 1.3 % off; over the cluster, 0.86
    and 0.1 %. The price: a real size trend inside one cluster is flattened to its mean.
    """
    scales = np.asarray(scales, dtype=np.float64)
    groups = np.asarray(groups)
    selected = np.asarray(selected, dtype=bool)
    w = np.where(np.isfinite(frames) & (frames > 0), np.asarray(frames, dtype=np.float64), 0.0)
    out = np.zeros(scales.shape[0])
    for g in np.unique(groups[selected]):
        idx = np.flatnonzero(selected & (groups == g))
        wg = w[idx] if w[idx].sum() > 0 else np.ones(idx.size)
        out[idx] = (np.log(scales[np.ix_(idx, idx)]) * wg[None]).sum(1) / wg.sum()
    return out


def parse_clusters(clusters) -> list[int]:
    if isinstance(clusters, str):
        clusters = [c for c in clusters.replace(",", " ").split() if c]
    try:
        return [int(c) for c in clusters]
    except (TypeError, ValueError):
        raise ConfigError(f"clusters must be 'all' or a list of cluster numbers, got "
                          f"{clusters!r}") from None


def radial_profile(intens: np.ndarray, support: np.ndarray, qnorm: np.ndarray,
                   gain: np.ndarray | None = None, nbins: int | None = None) -> np.ndarray:
    """Mean intensity of all averages (divided by gain) in integer |q| shells of the measured
    points; shells without data take their nearest filled neighbour's value. Index = |q|."""
    gain = np.ones(intens.shape[0]) if gain is None else gain
    shell = np.rint(qnorm).astype(int)
    nbins = int(shell.max()) + 2 if nbins is None else int(nbins)
    shell = np.minimum(shell, nbins - 1)
    mean_image = (intens / gain[:, None, None]).mean(0)
    sums = np.bincount(shell[support], weights=mean_image[support], minlength=nbins)
    counts = np.bincount(shell[support], minlength=nbins)
    filled = (counts > 0) & (sums > 0)
    if not filled.any():
        raise InputError(None, "the averages have no measured intensity")
    prof = np.zeros(nbins)
    prof[filled] = sums[filled] / counts[filled]
    return fill_from_nearest(prof, filled)


def fill_from_nearest(values: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """``values`` with every entry where ``filled`` is False replaced by the nearest filled
    entry's (by index; ties to the lower index): a radial profile's empty shells."""
    idx = np.flatnonzero(filled)
    return values[idx[np.abs(np.arange(values.size)[:, None] - idx[None, :]).argmin(1)]]


def profile_at(qnorm: np.ndarray, profile: np.ndarray) -> np.ndarray:
    """The radial profile (index = |q|) read at each pixel's |q|, linearly interpolated."""
    return np.interp(qnorm, np.arange(profile.size), profile)


def normalise(intens, support, qnorm, profile, gain) -> np.ndarray:
    """log(I / (gain I_0(|q|)) + 0.1) on measured points, 0 elsewhere (float32)."""
    ref = profile_at(qnorm, profile)
    x = np.log(intens / (gain[:, None, None] * ref[None]) + LOG_FLOOR)
    return np.where(support[None], x, 0.0).astype(np.float32)


def beamstop_radius(det) -> float:
    """The beamstop's edge: the smallest |q| (pixels at the centre) of a detector pixel used in
    the likelihood (mask 0). The averages' support reaches further in (the EMC merge spreads each
    pixel over the grid points around it), so it is read from the detector, not the averages."""
    used = np.asarray(det.mask) == 0
    if not used.any():
        raise InputError(None, "the detector has no pixel with mask 0 (used)")
    qnorm = np.sqrt(np.asarray(det.qx) ** 2 + np.asarray(det.qy) ** 2 + np.asarray(det.qz) ** 2)
    return float(qnorm[used].min())


def loss_weight(support: np.ndarray, qnorm: np.ndarray, volume_size: int,
                q_min: float = 0.0) -> np.ndarray:
    """Pixels in the loss: measured, at |q| >= q_min (pixels at the beamstop's edge are partly
    shadowed: merged, they read too low) and inside the sphere the V^3 volume holds at any
    rotation."""
    return support & (qnorm >= q_min) & (qnorm <= volume_size // 2 - 1)


def pixel_weights(mask: np.ndarray, qnorm: np.ndarray, profile: np.ndarray,
                  radial_weighting: float = 0.0) -> np.ndarray:
    """Weight of each pixel in the Poisson deviance: ``mask`` times (I_0(|q|) / I_0max)^-alpha,
    alpha = ``radial_weighting``: the brightest measured shell keeps its Poisson weight 1 and
    fainter shells weigh more.

    alpha = 0 is the plain Poisson likelihood: a pixel's deviance grows like lambda x (relative
    error)^2, so a shell at high q, 10^3 times fainter than the first rings, weighs 10^3 times
    less for the same relative misfit. That is right for pure counting noise but class averages
    of hundreds of frames are dominated by model error at low q (blur of the 2D classes, size
    spread), and the decoder then gives up the high-q fall-off (the particle's edges, hence its
    phased volume). alpha = 1 makes every shell count by its relative misfit, as the paper's
    loss on radially normalised images does.
    """
    if radial_weighting < 0:
        raise ConfigError(f"radial weighting must be >= 0, got {radial_weighting}")
    ref = profile_at(qnorm, profile)
    w = np.where(mask, np.power(np.maximum(ref, 1e-30), -float(radial_weighting)), 0.0)
    lowest = w[mask].min() if mask.any() else 1.0
    return (w / lowest).astype(np.float32)


def frame_weights(frames: np.ndarray, mode: str = "none") -> np.ndarray:
    """Loss weight per average, mean 1: "none" (all equal), "frames" (the frame count: an average
    of many frames is less noisy) or "sqrt" (its square root, a compromise that keeps small
    classes, e.g. rare states, in play)."""
    frames = np.where(np.isfinite(frames) & (frames > 0), np.asarray(frames, dtype=np.float64),
                      0.0)
    if mode == "none" or frames.sum() <= 0:
        return np.ones(frames.size, dtype=np.float32)
    if mode == "frames":
        w = frames
    elif mode == "sqrt":
        w = np.sqrt(frames)
    else:
        raise ConfigError(f"frame weighting must be none, frames or sqrt, got {mode!r}")
    return (w / w.mean()).astype(np.float32)


def tensors(data: VAEData, q: np.ndarray, profile: np.ndarray, index=None,
            weighting: str = "none") -> dict:
    """Torch tensors of the selected averages (or of ``index``); ``weight`` per average from
    :func:`frame_weights` over these averages."""
    index = np.flatnonzero(data.selected) if index is None else np.asarray(index)
    qnorm = np.linalg.norm(q, axis=0)
    image = normalise(data.intens[index], data.support, qnorm, profile, data.gain[index])
    return {
        "index": torch.as_tensor(index, dtype=torch.long),
        "image": torch.as_tensor(image),
        "counts": torch.as_tensor(data.intens[index], dtype=torch.float32),
        "quaternion": torch.as_tensor(data.quaternion[index], dtype=torch.float32),
        "log_gain": torch.as_tensor(np.log(data.gain[index]), dtype=torch.float32),
        "weight": torch.as_tensor(frame_weights(data.frames[index], weighting)),
        **({} if data.log_scale is None else
           {"log_scale": torch.as_tensor(data.log_scale[index], dtype=torch.float32)}),
    }


def synthetic_averages(volumes: np.ndarray, size: int, detd: float, ewald_rad: float,
                       num: int, rng: np.random.Generator, photons: float = 300.0,
                       beamstop: float = 2.0, shapes=None) -> dict:
    """Noisy class averages of known volumes at random orientations (a stand-in for EMC averages).

    ``volumes (K, N, N, N)`` centred intensities; each average picks a volume (among ``shapes``,
    default all), a uniformly random orientation, is sliced on the Ewald points of an S x S grid
    (:func:`spiscape.simulate.frames.slice_volume`, the simulator's convention), scaled so that
    the mean volume gives ``photons`` per pixel at |q| = beamstop, and drawn from a Poisson law.
    The support is the ring beamstop <= |(cx, cy)| <= (S - 1) / 2.
    """
    from spiscape.simulate.frames import quaternion_to_matrix, random_quaternions, slice_volume
    from spiscape.vae.model import ewald_grid

    shapes = np.arange(volumes.shape[0]) if shapes is None else np.asarray(shapes)
    q = ewald_grid(size, detd, ewald_rad).reshape(3, -1)
    c = (size - 1) / 2.0
    cx, cy = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    radius = np.hypot(cx, cy)
    support = (radius >= beamstop) & (radius <= c)
    which = rng.choice(shapes, size=num)
    quats = random_quaternions(num, rng)
    rots = quaternion_to_matrix(quats)
    clean = np.empty((num, size, size))
    for k in np.unique(which):
        sel = which == k
        clean[sel] = slice_volume(volumes[k], q, rots[sel]).reshape(-1, size, size)
    ring = support & (radius < beamstop + 1.0)
    scale = photons / clean[:, ring].mean()
    counts = rng.poisson(clean * scale).astype(np.float32)
    counts[:, ~support] = 0.0
    return {"intens": counts, "support": support, "quaternion": quats, "shape_index": which,
            "gain": np.ones(num), "replicate": np.zeros(num, dtype=np.int32),
            "class": np.arange(num, dtype=np.int32), "frames": np.ones(num, dtype=np.float32)}


def write_synthetic(sim: dict, averages_path, orientation_path, extra: dict | None = None):
    """Write synthetic averages in the averages.h5 / orientation.h5 layout (plus truth keys)."""
    from spiscape.io.averages import Averages, write_averages
    from spiscape.io.orientation import write_orientation

    count = len(sim["gain"])
    averages = Averages(intens=sim["intens"], support=sim["support"], replicate=sim["replicate"],
                        klass=sim["class"], frames=sim["frames"], count=count,
                        size=sim["intens"].shape[-1])
    write_averages(averages_path, averages, [], 0.0,
                   truth={"shape_index": sim["shape_index"], **(extra or {})})
    write_orientation(orientation_path, {
        "quaternion": sim["quaternion"], "gain": sim["gain"], "cc": np.ones(count),
        "mean_cc": np.ones(count), "grid_cc": np.zeros((count, 0))}, {})
