"""Frames shared between class averages (spiscape.embed.sharing): the similarity, the weakest cut,
and the science: objects that one common-line cluster holds together are split by their frames,
while a population with a size spread is kept whole."""

from __future__ import annotations

import numpy as np
import pytest

from spiscape.embed.sharing import (
    cluster_shares,
    membership_similarity,
    split_clusters,
    weakest_cut,
)
from spiscape.io.replicate import Replicate


def test_membership_similarity_by_hand():
    # averages.h5 rows: (0, 0), (0, 1), (1, 0); replicate 1's class 1 was left out
    rep0 = Replicate(0, np.array([0, 1, 1]), np.array([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5]]))
    rep1 = Replicate(1, np.array([1, 2]), np.array([[0.8, 0.2], [0.0, 1.0]]))
    sim = membership_similarity(3, [rep0, rep1], np.array([0, 0, 1]), np.array([0, 1, 0]), 3)
    # membership vectors over frames 0, 1, 2 (frame 1 drawn twice by replicate 0)
    m = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.8, 0.0]])
    gram = m @ m.T
    expected = gram / np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
    np.testing.assert_allclose(sim, expected)
    blocked = membership_similarity(3, [rep0, rep1], np.array([0, 0, 1]), np.array([0, 1, 0]), 3,
                                    block=1)
    np.testing.assert_allclose(blocked, sim)


def test_weakest_cut_finds_the_bridge_and_disconnected_parts():
    w = np.zeros((6, 6))
    w[:3, :3] = 1.0
    w[3:, 3:] = 1.0
    np.fill_diagonal(w, 0.0)
    share, side = weakest_cut(w)  # two parts that share nothing
    assert share == 0.0 and sorted(side.tolist()) == [False] * 3 + [True] * 3
    w[2, 3] = w[3, 2] = 0.01  # a weak bridge: its weight over one side's volume (6.01)
    share, side = weakest_cut(w)
    assert share == pytest.approx(0.01 / 6.01)
    assert side[:3].all() != side[3:].any() or side[3:].all() != side[:3].any()
    assert side.sum() == 3


def profile(kind: str, size: float, x: np.ndarray) -> np.ndarray:
    """1D stand-ins of two objects' patterns: fringes whose spacing follows the size (a
    sphere-like population), or a rod-like streak."""
    if kind == "fringes":
        return 1.0 + np.cos(2 * np.pi * 3.0 * size * x) ** 2 * np.exp(-x)
    return 0.3 + 2.0 * np.exp(-((x - 0.5 * size) / 0.15) ** 2)


def emc_replicates(rng, photons=300):
    """Two bootstrap replicates whose class occupancies are the posterior of each frame under
    the classes' patterns (Poisson, flat priors, as the EMC's), not set by hand: a population
    with a 6 % size spread cut into five size classes, and a second object in two classes."""
    x = np.linspace(0.0, 1.0, 48)
    kinds = ["fringes"] * 240 + ["streak"] * 80
    sizes = np.concatenate([rng.normal(1.0, 0.06, 240), rng.uniform(0.8, 1.2, 80)])
    frames = []
    for kind, size in zip(kinds, sizes, strict=True):
        p = profile(kind, size, x)
        frames.append(rng.poisson(photons * p / p.sum()))
    frames = np.array(frames, dtype=np.float64)
    reps, truth = [], []
    for number, offset in enumerate((0.0, 0.02)):
        models = [("fringes", s + offset) for s in np.linspace(0.9, 1.1, 5)]
        models += [("streak", s + offset) for s in (0.9, 1.1)]
        logp = np.log(np.array([profile(k, s, x) for k, s in models]))
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        drawn = np.sort(rng.integers(0, len(kinds), len(kinds)))  # with replacement
        loglik = frames[drawn] @ logp.T
        post = np.exp(loglik - loglik.max(axis=1, keepdims=True))
        reps.append(Replicate(number, drawn, post / post.sum(axis=1, keepdims=True)))
        truth += [k for k, _ in models]
    return reps, np.array(truth), len(kinds)


def test_objects_in_one_cluster_are_split_by_their_frames_and_a_size_spread_is_kept_whole():
    reps, truth, num_frames = emc_replicates(np.random.default_rng(5))
    replicate_of = np.repeat([0, 1], 7)
    class_of = np.tile(np.arange(7), 2)
    sim = membership_similarity(14, reps, replicate_of, class_of, num_frames)
    # the common lines put every average in one cluster
    labels, splits = split_clusters(sim, np.zeros(14, dtype=np.int64))
    assert len(splits) == 1 and splits[0]["sizes"] == [10, 4] and splits[0]["share"] < 1e-4
    # the two objects apart, each whole: the five size classes of both replicates together
    assert len(set(labels[truth == "fringes"])) == 1
    assert len(set(labels[truth == "streak"])) == 1
    assert labels[truth == "fringes"][0] != labels[truth == "streak"][0]
    # the size classes share their frames: no threshold in the default's decade cuts them
    for threshold in (1e-4, 5e-4, 1e-3):
        assert split_clusters(sim, np.zeros(14, dtype=np.int64), threshold)[1] == splits
    # off, and clusters that are already apart stay as they are
    assert split_clusters(sim, np.zeros(14, dtype=np.int64), 0.0)[1] == []
    apart = np.where(truth == "fringes", 0, 1)
    again, none = split_clusters(sim, apart)
    assert none == [] and again.tolist() == apart.tolist()


def test_averages_sharing_no_frame_with_their_cluster_stay_in_it():
    sim = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    labels, splits = split_clusters(sim, np.array([0, 0, 0]))
    assert splits == [] and labels.tolist() == [0, 0, 0]
    # outliers (-1) are never a cluster
    labels, splits = split_clusters(sim, np.array([-1, -1, 0]))
    assert splits == [] and labels.tolist() == [-1, -1, 0]


def test_cluster_shares_by_hand():
    sim = np.array([[1.0, 0.4, 0.1, 0.0],
                    [0.4, 1.0, 0.0, 0.0],
                    [0.1, 0.0, 1.0, 0.2],
                    [0.0, 0.0, 0.2, 1.0]])
    shares = cluster_shares(sim, np.array([0, 0, 1, -1]))
    # volumes (similarity to all others): cluster 0: 0.5 + 0.4, cluster 1: 0.3
    np.testing.assert_allclose(shares, [[1.0, 0.1 / 0.3], [0.1 / 0.3, 1.0]])
