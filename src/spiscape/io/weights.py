"""Weights files: ``vae/model.pt``, ``vae/checkpoint.pt`` (:mod:`spiscape.vae.train`) and
``embedding_model.pt`` (:mod:`spiscape.embed.regressor`).

Each is a ``torch.save`` of a dict that holds only tensors, numbers, strings, None and dicts,
lists and tuples of them (NumPy arrays stored as tensors), read back with
``torch.load(weights_only=True)``: a file planted in an output folder can hold data, never code.
The dict's keys are documented by the module that writes it.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from spiscape.errors import InputError


def plain(obj):
    """``obj`` with only what ``torch.load(weights_only=True)`` reads back: tensors, numbers,
    strings, None, and dicts, lists and tuples of them (NumPy arrays become tensors, NumPy
    scalars numbers, paths strings). Nothing is ever unpickled from an output folder: a file
    placed there can hold data, not code."""
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int)) else str(k)): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a weights-only file")


def load_plain(path, what: str) -> dict:
    """A file of :func:`plain` values, read with ``weights_only=True`` (never unpickled)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except OSError as exc:
        raise InputError(path, f"unreadable {what} ({exc.strerror or exc})") from None
    except Exception as exc:  # not a torch file, or one holding Python objects (pickle)
        text = str(exc).strip()
        if "weights_only" in text or "Weights only" in text:
            reason = ("it holds Python objects other than tensors and plain values, which are "
                      "never unpickled; delete it")
        else:
            reason = f"not a torch weights file: {type(exc).__name__}"
        raise InputError(path, f"not a spiscape {what} ({reason})") from None
