"""Atomic outputs: write under a temporary name, rename when complete.

A killed job then never leaves a file that looks finished (DESIGN.md, "Contracts").
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def check_output(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output that cannot be written: a directory at the path, or a
    file (or nothing creatable) where its folder should be. Raises InputError naming the path."""
    return _check_writable(Path(path), folder=False)


def check_output_dir(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output folder that cannot be made: a file at the path or
    where one of its parents should be, or a parent that is not writable."""
    return _check_writable(Path(path), folder=True)


def _check_writable(path: Path, folder: bool) -> Path:
    from spiscape.errors import InputError

    if folder and path.exists() and not path.is_dir():
        raise InputError(path, "is a file; give a folder for the output")
    if not folder and path.is_dir():
        raise InputError(path, "is a directory; give a file name for the output")
    # the nearest existing folder on the way (the folder itself when it exists)
    for parent in ((path,) if folder else ()) + tuple(path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise InputError(path, f"cannot be created: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise InputError(path, f"cannot be created: {parent} is not writable")
            break
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name keeps the suffix so that writers choosing a format by extension still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
