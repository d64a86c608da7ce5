"""Command-line value types shared by the subcommands."""

from __future__ import annotations

import argparse
import math


def auto_or_number(minimum: float | None = None, kind=float, words: tuple = ("auto",)):
    """An argparse type: the word 'auto' (a choice the command derives from the data; or any of
    ``words``), or a finite number (``kind``: float or int) >= ``minimum``."""
    what = "an integer" if kind is int else "a number"
    named = " or ".join(repr(w) for w in words)

    def parse(text: str):
        if text in words:
            return text
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} or {named}, got {text!r}") \
                from None
        if not math.isfinite(value) or (minimum is not None and value < minimum):
            bound = "" if minimum is None else f" >= {minimum:g}"
            raise argparse.ArgumentTypeError(f"expected {what}{bound} or {named}, got {text!r}")
        return value

    return parse


def number_in(low: float | None = None, high: float | None = None, kind=float,
              low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite ``kind`` (float by default) between ``low`` and ``high``
    (None: unbounded; ``*_open``: the bound itself excluded). With these types a command's
    single-value limits are checked while its arguments are parsed, and the workflow's config
    check (:mod:`spiscape.workflow_config`) applies the same limits before any job runs; a
    parameter dataclass's ``check()`` holds only the rules that relate several values."""
    what = "an integer" if kind is int else "a number"
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    if low is not None and high is not None:
        bound = f" in {lo}, {hi}"
    elif low is not None:
        bound = f" {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        bound = f" {'<' if high_open else '<='} {high:g}"
    else:
        bound = ""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        bad = not math.isfinite(value)
        if low is not None:
            bad |= value <= low if low_open else value < low
        if high is not None:
            bad |= value >= high if high_open else value > high
        if bad:
            raise argparse.ArgumentTypeError(f"expected {what}{bound}, got {text!r}")
        return value

    parse.__name__ = f"{kind.__name__}{bound}"
    return parse


def at_least(minimum: int, kind=int):
    """An argparse type: a ``kind`` (int by default) >= ``minimum``."""
    return number_in(minimum, kind=kind)


def add_run_control(parser, device_help: str, cpu_default: str = "1024") -> None:
    """The options every EMC engine shares: memory budget, device, resume and checkpoint."""
    parser.add_argument("--memory-mb", type=at_least(1), default=None,
                        help=f"memory a rank may use for cached frames and views and the blocks "
                             f"in flight (default: {cpu_default} on a CPU, 40%% of the free GPU "
                             f"memory)")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                        help=device_help)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint of a killed run, if there is one "
                             "(same data and settings)")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file (default: beside --out, .ckpt.h5; removed when "
                             "the run finishes)")


def q_per_voxel_of(truth, q_per_pixel, detector_path) -> float | None:
    """The 3D grid's q step (1/nm per voxel) of ``--truth`` (the simulator's) or
    ``--q-per-pixel`` (1/nm per detector pixel at the centre, scaled by detd / ewald_rad of the
    detector file); None when neither is given."""
    if truth is not None:
        from spiscape.io.truth import read_q_per_voxel

        return read_q_per_voxel(truth)
    if q_per_pixel is None:
        return None
    from spiscape.io import read_detector

    det = read_detector(detector_path)
    return float(q_per_pixel) * float(det.detd) / float(det.ewald_rad)
