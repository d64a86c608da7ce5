"""Tiles of the upper triangle, the averages they come from, and the merge into commonlines.h5.

Tile plan. The pairs (i, j), i < j, of A averages are listed row by row, (0, 1), (0, 2), ...,
(0, A-1), (1, 2), ... (P = A(A-1)/2 pairs); tile k of T holds the contiguous range
``[k P // T, (k+1) P // T)`` of that list, so tiles differ by at most one pair and a tile is a
few runs of consecutive j for consecutive i: one batched product with no wasted pairs (a square
block of the triangle would waste the pairs below the diagonal on the blocks that straddle it).

The files (tiles and ``commonlines.h5``) are :mod:`spiscape.io.commonlines`.
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np

from spiscape.errors import ConfigError, InputError
from spiscape.io.averages import Averages, read_averages

log = logging.getLogger(__name__)

#: attributes that must agree between the tiles of one matrix
SHARED_ATTRS = ("n_angles", "r_min", "r_max", "radial_step", "transform", "lines", "missing",
                "scale_range",
                "interpolation", "precision", "averages_sha256", "num_averages", "num_tiles")


# ----------------------------------------------------------------------------- tile plan
def num_pairs(num_averages: int) -> int:
    return num_averages * (num_averages - 1) // 2


def tile_range(num_averages: int, tile: int, num_tiles: int) -> tuple[int, int]:
    """[start, stop) of tile ``tile`` in the row-major list of upper-triangle pairs."""
    if num_tiles < 1:
        raise ConfigError(f"num_tiles must be at least 1, got {num_tiles}")
    if not 0 <= tile < num_tiles:
        raise ConfigError(f"tile must lie in [0, {num_tiles}), got {tile}")
    total = num_pairs(num_averages)
    return tile * total // num_tiles, (tile + 1) * total // num_tiles


def pairs_from_flat(num_averages: int, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) of flat indices into the row-major list of pairs i < j."""
    flat = np.asarray(flat, dtype=np.int64)
    rows = np.arange(num_averages, dtype=np.int64)
    offsets = rows * (2 * num_averages - rows - 1) // 2  # index of (i, i+1)
    i = np.searchsorted(offsets, flat, side="right") - 1
    j = flat - offsets[i] + i + 1
    return i, j


def tile_pairs(num_averages: int, tile: int, num_tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) of every pair of a tile, in plan order."""
    start, stop = tile_range(num_averages, tile, num_tiles)
    return pairs_from_flat(num_averages, np.arange(start, stop, dtype=np.int64))


# ----------------------------------------------------------------------------- averages
def averages_checksum(intens: np.ndarray, support: np.ndarray) -> str:
    """sha256 of the averages (float64, C order) and the support: ties tiles to their input."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(intens, dtype="<f8").tobytes())
    digest.update(np.ascontiguousarray(support, dtype=np.uint8).tobytes())
    digest.update(repr(tuple(np.shape(intens))).encode())
    return digest.hexdigest()


def pairable_averages(path) -> Averages:
    """``averages.h5`` (:mod:`spiscape.io.averages`) for common lines: at least two."""
    averages = read_averages(path)
    if averages.count < 2:
        raise InputError(path, f"{averages.count} average(s): common lines need at least 2")
    return averages


# ----------------------------------------------------------------------------- tile files



def _short(value, width: int = 40) -> str:
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def check_tiles(tiles: list[dict]) -> None:
    """Every tile present once, from the same averages and parameters; InputError naming the
    first bad tile otherwise."""
    if not tiles:
        raise InputError(None, "no tile files given")
    # the reference is the majority's settings, so that the odd tile out is the one named
    signatures = [repr([_short(t["attrs"].get(k), 10**9) for k in SHARED_ATTRS + ("radii",)])
                  for t in tiles]
    first = tiles[max(range(len(tiles)), key=lambda k: (signatures.count(signatures[k]), -k))]
    reference = first["attrs"]
    seen: dict[int, str] = {}
    for tile in tiles:
        attrs, path = tile["attrs"], tile["path"]
        for key in SHARED_ATTRS + ("radii",):
            if key in reference and not _same(attrs.get(key), reference[key]):
                if key == "averages_sha256":
                    raise InputError(path, f"tile {attrs['tile']} comes from different averages "
                                           f"(checksum {str(attrs[key])[:12]}... against "
                                           f"{str(reference[key])[:12]}... of {first['path']})")
                raise InputError(path, f"tile {attrs['tile']} has a different {key} "
                                       f"({_short(attrs.get(key))} against "
                                       f"{_short(reference[key])} in {first['path']})")
        number = int(attrs["tile"])
        if number in seen:
            raise InputError(path, f"tile {number} given twice (also {seen[number]})")
        seen[number] = path
        count, num_tiles = int(attrs["num_averages"]), int(attrs["num_tiles"])
        if not 0 <= number < num_tiles:
            raise InputError(path, f"tile number {number} is not in [0, {num_tiles})")
        start, stop = tile_range(count, number, num_tiles)
        plan_i, plan_j = tile_pairs(count, number, num_tiles)
        if (int(attrs["pair_start"]), int(attrs["pair_stop"])) != (start, stop) or \
                not np.array_equal(tile["i"], plan_i) or not np.array_equal(tile["j"], plan_j):
            raise InputError(path, f"tile {number} does not hold pairs [{start}, {stop}) of the "
                                   f"plan for {attrs['num_averages']} averages in "
                                   f"{attrs['num_tiles']} tiles")
    num_tiles = int(reference["num_tiles"])
    absent = sorted(set(range(num_tiles)) - set(seen))
    if absent:
        raise InputError(None, f"tile {absent[0]} of {num_tiles} is missing"
                               + (f" ({len(absent)} tiles missing)" if len(absent) > 1 else ""))


def merge_tiles(tiles: list[dict]) -> dict:
    """The symmetric ``cc`` and ``angles`` of checked tiles, with the shared attributes."""
    check_tiles(tiles)
    attrs = tiles[0]["attrs"]
    count = int(attrs["num_averages"])
    cc = np.full((count, count), np.nan)
    angles = np.zeros((count, count, 2))
    scales = np.ones((count, count))
    for tile in tiles:
        i, j = tile["i"], tile["j"]
        cc[i, j] = cc[j, i] = tile["cc"]
        angles[i, j, 0] = angles[j, i, 1] = tile["angle_i"]
        angles[i, j, 1] = angles[j, i, 0] = tile["angle_j"]
        scales[i, j] = tile["scale"]
        scales[j, i] = 1.0 / np.asarray(tile["scale"])
    np.fill_diagonal(cc, 1.0)
    if np.isnan(cc).any():  # cannot happen after check_tiles; guards against a bad plan
        raise InputError(tiles[0]["path"], "tiles leave pairs of the matrix empty")
    merged_attrs = {k: v for k, v in attrs.items()
                    if k not in ("tile", "pair_start", "pair_stop")}
    return {"cc": cc, "angles": angles, "scales": scales, "replicate": tiles[0]["replicate"],
            "class": tiles[0]["class"], "attrs": merged_attrs}


def tile_attrs(params_attrs: dict, averages: Averages, signed_radii, tile: int,
               num_tiles: int) -> dict:
    """The attributes of a tile file (with the checksum that ties it to its averages)."""
    count = int(averages.intens.shape[0])
    start, stop = tile_range(count, tile, num_tiles)
    attrs = dict(params_attrs)
    attrs.update(radii=np.asarray(signed_radii, dtype=np.float64),
                 averages_sha256=averages_checksum(averages.intens, averages.support),
                 averages=os.fspath(averages.path),
                 tile=tile, num_tiles=num_tiles, num_averages=count, pair_start=start,
                 pair_stop=stop)
    return attrs


# ----------------------------------------------------------------------------- figure
def hierarchical_order(cc: np.ndarray, max_optimal: int = 2000) -> np.ndarray:
    """Leaf order of average-linkage clustering on 1 - cc (optimal leaf order for small A)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    if cc.shape[0] < 3:
        return np.arange(cc.shape[0])
    distance = np.clip(1.0 - (cc + cc.T) / 2.0, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform(distance, checks=False), method="average",
                   optimal_ordering=cc.shape[0] <= max_optimal)
    return leaves_list(tree)


def cc_figure(merged: dict, path) -> None:
    """The CC matrix as an image, averages in hierarchical-clustering order, with a colour bar."""
    from spiscape.plotting import plt, save

    cc = merged["cc"]
    order = hierarchical_order(cc)
    off = cc[~np.eye(cc.shape[0], dtype=bool)]
    vmin, vmax = (float(np.percentile(off, 1)), float(off.max())) if off.size else (0.0, 1.0)
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    image = ax.imshow(cc[np.ix_(order, order)], vmin=vmin, vmax=max(vmax, vmin + 1e-6),
                      cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="common-line CC (diagonal 1 off scale)")
    attrs = merged.get("attrs", {})
    ax.set_title(f"{cc.shape[0]} averages, transform={attrs.get('transform', '?')}, "
                 f"{attrs.get('n_angles', '?')} angles", fontsize=10)
    ax.set_xlabel("average (hierarchical-clustering order)")
    ax.set_ylabel("average")
    save(fig, path)
