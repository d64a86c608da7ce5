"""Command-line value types shared by the subcommands."""

from __future__ import annotations

import argparse
import math


def auto_or_number(minimum: float | None = None, kind=float):
    """An argparse type: the word 'auto' (a choice the command derives from the data), or a
    finite number (``kind``: float or int) >= ``minimum``."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        if text == "auto":
            return text
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} or 'auto', got {text!r}") \
                from None
        if not math.isfinite(value) or (minimum is not None and value < minimum):
            bound = "" if minimum is None else f" >= {minimum:g}"
            raise argparse.ArgumentTypeError(f"expected {what}{bound} or 'auto', got {text!r}")
        return value

    return parse


def at_least(minimum: int, kind=int):
    """An argparse type: a ``kind`` (int by default) >= ``minimum``."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"{kind.__name__} >= {minimum}"
    return parse
