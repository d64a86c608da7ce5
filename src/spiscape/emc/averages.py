"""Gather the class averages of all bootstrap replicates: the classes that hold enough frames,
with where they came from (the file is :mod:`spiscape.io.averages`, the replicates
:mod:`spiscape.io.replicate`)."""

from __future__ import annotations

import logging

import numpy as np

from spiscape.errors import InputError
from spiscape.io.averages import Averages, write_averages
from spiscape.io.replicate import read_replicate

log = logging.getLogger(__name__)


def collect_averages(replicate_paths, min_frames: float = 5.0) -> Averages:
    """The classes of every replicate holding at least ``min_frames`` frames, concatenated."""
    intens, replicate, klass, frames = [], [], [], []
    size = support = None
    for number, path in enumerate(replicate_paths):
        rep = read_replicate(path, number)
        if size is None:
            size = rep.intens.shape[1]
        elif rep.intens.shape[1] != size:
            raise InputError(path, f"grid size {rep.intens.shape[1]} differs from {size}")
        support = rep.support if support is None else support & rep.support
        weight = rep.occupancies.sum(axis=0)
        keep = np.flatnonzero(weight >= min_frames)
        intens.append(rep.intens[keep])
        replicate.append(np.full(keep.size, rep.number, np.int32))
        klass.append(keep.astype(np.int32))
        frames.append(weight[keep])
    if not intens or sum(x.shape[0] for x in intens) == 0:
        raise InputError(replicate_paths[0] if replicate_paths else None,
                         f"no class holds {min_frames} frames or more; nothing to gather")
    stack = np.concatenate(intens)
    return Averages(intens=stack, support=support, replicate=np.concatenate(replicate),
                    klass=np.concatenate(klass), frames=np.concatenate(frames),
                    count=stack.shape[0], size=stack.shape[1])


def gather_averages(replicate_paths, out, min_frames: float = 5.0) -> Averages:
    """Collect the averages of the replicates and write ``averages.h5``."""
    result = collect_averages(replicate_paths, min_frames)
    write_averages(out, result, replicate_paths, min_frames)
    return result
