"""Errors that reach the user as one line: the file and what is wrong with it."""

from __future__ import annotations

import os


class SpiscapeError(Exception):
    """An error the user can act on; the CLI prints it as one line and exits non-zero."""


class InputError(SpiscapeError):
    """A bad input file, e.g. ``InputError(path, "num_pix 4096 but the detector has 4000")``."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ConfigError(SpiscapeError):
    """An impossible or inconsistent setting."""
