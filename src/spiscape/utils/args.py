"""Command-line value types shared by the subcommands."""

from __future__ import annotations

import argparse
import math


def auto_or_number(minimum: float | None = None):
    """An argparse type: the word 'auto' (a choice the command derives from the data), or a
    finite number >= ``minimum``."""

    def parse(text: str):
        if text == "auto":
            return text
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") \
                from None
        if not math.isfinite(value) or (minimum is not None and value < minimum):
            bound = "" if minimum is None else f" >= {minimum:g}"
            raise argparse.ArgumentTypeError(f"expected a finite number{bound} or 'auto', got "
                                             f"{text!r}")
        return value

    return parse
