"""The common-line files (written by ``spiscape commonlines`` and ``merge-commonlines``; the
matrix is read by ``spiscape embed``, the scales by ``spiscape vae --size-correction``). How
the pairs are cut into tiles is :mod:`spiscape.commonlines.tiles`.

Tile file ``commonlines/tile{k}.h5``: datasets ``i``, ``j`` (int64), ``cc``, ``angle_i``,
``angle_j`` (float64, radians in [0, π)) and ``scale`` (float64: the radial scale of j's lines
that gave the best CC, 1 without a size search; read as 1 from older tiles) for the pairs of the
tile, in plan order; ``replicate``
and ``class`` of all averages (for the merged file); attributes: every sampling parameter
(:meth:`PolarParams.as_attrs`), ``radii`` (the radii actually used, negative ones in the
diameter layout), ``averages_sha256`` (checksum of the averages' intens and support),
``averages`` (path), ``tile``, ``num_tiles``, ``num_averages``, ``pair_start``, ``pair_stop``.

Merged file ``commonlines.h5``: ``cc (A, A)`` float64 symmetric with diagonal exactly 1;
``angles (A, A, 2)`` float64, ``angles[i, j] = (θ of the best line in i, θ in j)`` and
``angles[j, i] = angles[i, j][::-1]`` (diagonal 0); ``scales (A, A)`` float64, ``scales[i, j]`` the
radial scale of j against i, ``scales[j, i] = 1 / scales[i, j]`` (diagonal 1: j's size relative to
i's is ``1 / scales[i, j]``); ``replicate (A,)``, ``class (A,)``; the same
attributes as the tiles less the per-tile ones, plus ``num_tiles``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.io.hdf5 import open_input, plain_attr
from spiscape.utils.atomic import atomic_path

PAIR_DATASETS = ("i", "j", "cc", "angle_i", "angle_j", "scale")
#: pair datasets an older tile may lack, and what they read as
OPTIONAL_PAIR_DATASETS = {"scale": 1.0}


def _write_attrs(f, attrs: dict) -> None:
    for key, value in attrs.items():
        f.attrs[key] = value


def write_tile(path, result: dict, attrs: dict, replicate, klass) -> None:
    """Write one tile (layout in the module docstring) atomically."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key in PAIR_DATASETS:
            f.create_dataset(key, data=np.asarray(result[key]))
        f["replicate"] = np.asarray(replicate)
        f["class"] = np.asarray(klass)
        _write_attrs(f, attrs)


def read_tile(path) -> dict:
    """Datasets and attributes of a tile file; InputError when unreadable or incomplete."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such tile file")
    try:
        with h5py.File(path, "r") as f:
            data = {key: f[key][()] for key in PAIR_DATASETS + ("replicate", "class")
                    if key not in OPTIONAL_PAIR_DATASETS or key in f}
            for key, value in OPTIONAL_PAIR_DATASETS.items():
                data.setdefault(key, np.full(data["i"].shape, value))
            attrs = {key: plain_attr(value) for key, value in f.attrs.items()}
    except KeyError as exc:
        raise InputError(path, f"not a common-line tile (missing {exc})") from None
    except OSError as exc:
        raise InputError(path, f"unreadable tile file ({exc})") from None
    missing = [key for key in ("tile", "pair_start", "pair_stop", "num_tiles", "num_averages",
                               "averages_sha256") if key not in attrs]
    if missing:
        raise InputError(path, f"not a common-line tile (attributes {missing} missing)")
    data["attrs"] = attrs
    data["path"] = str(path)
    return data


def write_commonlines(path, merged: dict) -> None:
    """Write commonlines.h5 (layout in the module docstring) atomically."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key in ("cc", "angles", "scales", "replicate", "class"):
            f.create_dataset(key, data=merged[key])
        _write_attrs(f, merged["attrs"])


def read_commonlines(path) -> np.ndarray:
    """The symmetric common-line correlation matrix ``cc (A, A)`` of ``commonlines.h5``."""
    try:
        with h5py.File(path, "r") as f:
            cc = np.asarray(f["cc"][()], dtype=np.float64)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except KeyError:
        raise InputError(path, "missing dataset 'cc' (the common-line matrix)") from None
    except OSError as exc:
        raise InputError(path, f"not a readable HDF5 file ({exc})") from None
    if cc.ndim != 2 or cc.shape[0] != cc.shape[1]:
        raise InputError(path, f"cc has shape {cc.shape}, expected a square (A, A) matrix")
    if cc.shape[0] < 3:
        raise InputError(path, f"cc holds {cc.shape[0]} averages; an embedding needs 3 or more")
    if not np.all(np.isfinite(cc)):
        raise InputError(path, "cc holds NaN or infinite values (a common-line tile missing?)")
    if not np.allclose(cc, cc.T, atol=1e-5):
        raise InputError(path, "cc is not symmetric")
    return cc


def read_pair_scales(path, replicate, klass) -> np.ndarray:
    """``scales (A, A)`` of ``commonlines.h5`` for the averages whose ``replicate`` and
    ``klass`` (class) it must list in the same order (the VAE's size correction)."""
    with open_input(path, "a common-line file") as f:
        if "scales" not in f:
            raise InputError(path, "missing dataset 'scales' (a common-line file written before "
                                   "the size search? rerun spiscape merge-commonlines)")
        scales = np.asarray(f["scales"][()], dtype=np.float64)
        order = (np.asarray(f["replicate"][()]), np.asarray(f["class"][()]))
    count = np.asarray(klass).size
    if scales.shape != (count, count):
        raise InputError(path, f"scales has shape {scales.shape}, the averages are {count}")
    if not (np.array_equal(order[0], replicate) and np.array_equal(order[1], klass)):
        raise InputError(path, "its replicate/class order differs from the averages' (made "
                               "from another averages.h5?)")
    if not np.all(np.isfinite(scales) & (scales > 0)):
        raise InputError(path, "scales holds values that are not finite and positive")
    return scales
