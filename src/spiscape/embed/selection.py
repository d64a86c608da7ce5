"""Choosing frames from the landscape: by cluster, or by a region of the embedding or the VAE
latent (``"pc1>0.1,z1<0"``). Used by ``spiscape select`` and the analysis notebook."""

from __future__ import annotations

import re

import numpy as np

from spiscape.errors import ConfigError, InputError

CONDITION = re.compile(r"^\s*(pc|z)(\d+)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$", re.IGNORECASE)
OPERATORS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}


def parse_region(text: str) -> list[tuple[str, int, str, float]]:
    """``"pc1>0.1,pc2<0.3"`` -> ``[("pc", 0, ">", 0.1), ("pc", 1, "<", 0.3)]`` (0-based)."""
    conditions = []
    for part in text.split(","):
        if not part.strip():
            continue
        match = CONDITION.match(part)
        if not match:
            raise ConfigError(f"region condition '{part.strip()}' is not like 'pc1>0.1' "
                              "(pcN or zN, one of < <= > >=, a number)")
        kind, number, op, value = match.groups()
        if int(number) < 1:
            raise ConfigError(f"region condition '{part.strip()}': components count from 1")
        try:
            threshold = float(value)
        except ValueError:
            raise ConfigError(f"region condition '{part.strip()}': '{value}' is not a "
                              "number") from None
        conditions.append((kind.lower(), int(number) - 1, op, threshold))
    if not conditions:
        raise ConfigError("--region is empty")
    return conditions


def select_frames(landscape: dict, clusters=None, region: str | None = None,
                  path=None) -> np.ndarray:
    """Sorted frame indices chosen by cluster(s) or region; InputError when none is chosen."""
    coords = np.asarray(landscape["clpca"], dtype=np.float64)
    placed = np.all(np.isfinite(coords), axis=1)
    if clusters is not None:
        chosen = np.isin(landscape["label"], clusters) & placed
        what = f"cluster {', '.join(map(str, clusters))}"
    else:
        chosen = placed.copy()
        for kind, column, op, value in parse_region(region):
            table = coords if kind == "pc" else landscape.get("latent")
            if table is None or column >= table.shape[1]:
                width = 0 if table is None else table.shape[1]
                raise ConfigError(f"region names {kind}{column + 1} but the landscape has "
                                  f"{width} {'components' if kind == 'pc' else 'latent columns'}")
            values = np.asarray(table[:, column], dtype=np.float64)
            with np.errstate(invalid="ignore"):
                chosen &= OPERATORS[op](values, value) & np.isfinite(values)
        what = f"region {region}"
    indices = np.flatnonzero(chosen)
    if indices.size == 0:
        raise InputError(path, f"the selection ({what}) holds no frames")
    return indices
