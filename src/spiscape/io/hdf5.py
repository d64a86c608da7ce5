"""Opening a stage's HDF5 input so that every failure is one line naming the file."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import h5py
import numpy as np

from spiscape.errors import InputError


@contextlib.contextmanager
def open_input(path: str | os.PathLike, what: str):
    """``with open_input(path, "an averages file") as f:`` — h5py.File read-only.

    A missing file, a file that is not HDF5, and a missing dataset (KeyError inside the block)
    become :class:`InputError` naming the file; InputErrors raised inside pass through.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    try:
        with h5py.File(path, "r") as f:
            yield f
    except KeyError as exc:
        raise InputError(path, f"not {what} (missing {exc})") from None
    except OSError as exc:
        raise InputError(path, f"not a readable HDF5 file ({exc})") from None


def plain_attr(value):
    """An HDF5 attribute as a plain Python value (bytes decoded, NumPy scalars unwrapped)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
