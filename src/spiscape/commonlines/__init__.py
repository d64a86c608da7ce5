"""Common-line similarity of 2D class averages (Zhuang, Ayyer et al., IUCrJ 2022).

Two class averages that are (noisy) central slices of one 3D intensity share a line through the
origin. For every pair of averages the lines through the centre of each (``polar``) are compared
by Pearson correlation over all line pairs and the highest value is kept with its two angles
(``correlate``); the upper triangle of pairs is cut into tiles that run as separate jobs and are
merged into the symmetric matrix (``tiles``).

``compute_tile(averages, params, tile, num_tiles)`` is the whole computation of one tile;
``compute_matrix(averages, params)`` that of the full matrix.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from spiscape.commonlines.correlate import correlate_pairs
from spiscape.commonlines.polar import (
    PolarParams,
    line_angles,
    polar_lines,
    scale_factors,
    scaled_lines,
)
from spiscape.commonlines.tiles import (
    merge_tiles,
    pairable_averages,
    tile_attrs,
    tile_pairs,
)
from spiscape.io.averages import Averages

log = logging.getLogger(__name__)


def compute_tile(averages: Averages, params: PolarParams, tile: int = 0, num_tiles: int = 1,
                 device: str = "cpu", batch_pairs: int | None = None,
                 precision: str = "float64", workers: int | None = None,
                 progress: bool = True) -> dict:
    """Pairs, CCs and angles of one tile of the upper triangle, with its file attributes.

    ``averages`` as returned by :func:`pairable_averages`. The result has the datasets of a tile
    file plus ``attrs``, ``path`` and ``seconds`` (time of the correlation itself).
    """
    pair_i, pair_j = tile_pairs(averages.count, tile, num_tiles)
    sized = params.scale_range > 0
    lines, mask, signed = polar_lines(averages.intens, averages.support, params,
                                      normalise=not sized)
    if not mask.all():
        log.info("line masks differ between angles: per line-pair overlap (5 products per pair)")
    scales = scale_factors(params.scale_range, float(np.abs(signed).max()))
    log.info("tile %d/%d: %d pairs of %d averages, %d lines x %d samples (radii %.1f..%.1f)%s",
             tile, num_tiles, pair_i.size, lines.shape[0], lines.shape[1], lines.shape[2],
             float(np.abs(signed).min()), float(np.abs(signed).max()),
             f", {scales.size} radial scales {scales[0]:.3f}..{scales[-1]:.3f}" if sized else "")
    start = time.perf_counter()
    options = dict(device=device, batch_pairs=batch_pairs, precision=precision, workers=workers)
    if not sized:
        cc, line_i, line_j = correlate_pairs(lines, mask, pair_i, pair_j, progress=progress,
                                             **options)
        best_scale = np.ones(pair_i.size)
    else:
        cc, line_i, line_j, best_scale = correlate_scaled(lines, signed, scales, pair_i, pair_j,
                                                          progress, **options)
    seconds = time.perf_counter() - start
    log.info("tile %d: %d pairs in %.2f s (%.0f pairs/s)", tile, pair_i.size, seconds,
             pair_i.size / max(seconds, 1e-9))
    angles = line_angles(params.n_angles)
    return {
        "i": pair_i, "j": pair_j, "cc": cc, "angle_i": angles[line_i], "angle_j": angles[line_j],
        "scale": best_scale,
        "replicate": averages.replicate, "class": averages.klass,
        "attrs": {**tile_attrs(params.as_attrs(), averages, signed, tile, num_tiles),
                  "precision": precision},
        "path": averages.path, "seconds": seconds,
    }


def correlate_scaled(lines, radii_used, scales, pair_i, pair_j, progress: bool = True,
                     **options):
    """The size search (:mod:`spiscape.commonlines.polar`): for each pair the best CC over the
    radial ``scales`` of its second average, with its line indices and scale.

    ``lines (A, L, R)``: transformed, not normalised, on the uniform ``radii_used``. On equal CCs
    the scale nearest 1 wins (scales are tried from 1 outwards).
    """
    from tqdm import tqdm

    cc = np.full(pair_i.size, -np.inf)
    line_i = np.zeros(pair_i.size, dtype=np.int64)
    line_j = np.zeros(pair_i.size, dtype=np.int64)
    best = np.ones(pair_i.size)
    order = np.argsort(np.abs(np.log(scales)), kind="stable")
    for s in tqdm(scales[order], desc="radial scales", unit="scale", mininterval=2.0,
                  disable=None if progress else True):
        base, scaled = scaled_lines(lines, radii_used, float(s))
        mask = np.ones(base.shape[1:], dtype=bool)
        c, li, lj = correlate_pairs(base, mask, pair_i, pair_j, progress=False, lines_b=scaled,
                                    **options)
        better = c > cc
        cc[better], line_i[better], line_j[better], best[better] = c[better], li[better], \
            lj[better], s
    return cc, line_i, line_j, best


def compute_matrix(averages: Averages, params: PolarParams, device: str = "cpu",
                   batch_pairs: int | None = None, precision: str = "float64",
                   workers: int | None = None, progress: bool = True) -> dict:
    """The merged matrix (``cc``, ``angles``, labels, ``attrs``) computed as one tile."""
    tile = compute_tile(averages, params, 0, 1, device, batch_pairs, precision, workers,
                        progress)
    merged = merge_tiles([tile])
    merged["seconds"] = tile["seconds"]
    return merged


__all__ = [
    "PolarParams",
    "compute_matrix",
    "compute_tile",
    "merge_tiles",
    "pairable_averages",
]
