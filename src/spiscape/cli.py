"""The ``spiscape`` console script: one subcommand per pipeline stage.

Each subcommand is a module in :mod:`spiscape.commands` with ``add_args(parser)`` and
``main(args)`` (the cryoDRGN convention). Errors the user can act on are printed as one line,
``spiscape <command>: error: <file>: <problem>``, with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from spiscape import __version__
from spiscape.errors import SpiscapeError

# name -> module under spiscape.commands; the order is the order of the pipeline.
COMMANDS = {
    "simulate": "simulate",
    "inspect": "inspect_data",
    "convert": "convert",
    "classify2d": "classify2d",
    "averages": "averages",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spiscape",
        description="Map the structural landscape of heterogeneous samples measured by X-ray "
        "single particle imaging. Every stage of the pipeline is a subcommand.",
    )
    parser.add_argument("--version", action="version", version=f"spiscape {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"spiscape.commands.{module_name}")
        doc = (module.__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else name
        sub_parser = sub.add_parser(
            name,
            help=summary,
            description=doc,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        add_common_args(sub_parser)
        module.add_args(sub_parser)
        sub_parser.set_defaults(_main=module.main)
    return parser


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    parser.add_argument(
        "--log-file", default=None, help="also write the log to this file (Snakemake's log:)"
    )


def setup_logging(verbose: bool = False, log_file: str | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.log_file)
    try:
        result = args._main(args)
    except SpiscapeError as exc:
        logging.getLogger("spiscape").debug("error detail", exc_info=True)
        print(f"spiscape {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)
