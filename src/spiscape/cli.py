"""The ``spiscape`` console script: one subcommand per pipeline stage.

Each subcommand is a module in :mod:`spiscape.commands` with ``add_args(parser)`` and
``main(args)`` (the cryoDRGN convention). Errors the user can act on are printed as one line,
``spiscape <command>: error: <file>: <problem>``, with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import textwrap

from spiscape import __version__
from spiscape.errors import SpiscapeError

# name -> (module under spiscape.commands, one-line summary), in the order of the pipeline. The
# summary is kept here so that `spiscape --help` and every job's start-up import only the command
# that runs (tests check it matches the first line of the module's docstring).
COMMANDS = {
    "simulate": (
        "simulate",
        "Simulate an SPI dataset of heterogeneous gold nanoparticles (cubes melting into spheres).",
    ),
    "inspect": (
        "inspect_data",
        "Check a dataset: validate photons against the detector, summarise the frames, draw "
        "figures.",
    ),
    "convert": (
        "convert",
        "Convert photon files between Dragonfly HDF5, binary .emc and dense CXI frames.",
    ),
    "classify2d": (
        "classify2d",
        "EMC 2D classification of sparse photon frames into class averages (one bootstrap "
        "replicate).",
    ),
    "emc3d": (
        "emc3d",
        "Multi-model 3D EMC: K 3D intensity models and each frame's model, orientation and scale.",
    ),
    "averages": (
        "averages",
        "Gather the 2D class averages of all bootstrap replicates into averages.h5, with figures.",
    ),
    "commonlines": (
        "commonlines",
        "Common-line similarity of 2D class averages: one tile of the upper triangle, or all.",
    ),
    "merge-commonlines": (
        "merge_commonlines",
        "Merge common-line tiles into the symmetric similarity matrix commonlines.h5.",
    ),
    "embed": (
        "embed",
        "Embed the common-line similarity matrix (CLPCA and others), cluster, train the regressor.",
    ),
    "embed-new": (
        "embed_new",
        "Place unseen 2D averages into an existing landscape with the absolute-embedding "
        "regressor.",
    ),
    "landscape": (
        "landscape",
        "Per-frame landscape: each frame's embedding coordinates and cluster from its classes.",
    ),
    "place": (
        "place",
        "Place frames on the landscape of an existing dataset, without re-classifying them.",
    ),
    "select": (
        "select",
        "Select frames from the landscape (a cluster or a region) and write them as a photon list.",
    ),
    "orient": (
        "orient",
        "Orientation and gain of each 2D class average against Ewald slices of a reference "
        "intensity.",
    ),
    "vae": (
        "vae",
        "Train the VAE that turns 2D class averages into 3D intensities along a continuous latent.",
    ),
    "amortise": (
        "amortise",
        "Amortised inference: each frame's pose, conformation and scale from one encoder pass.",
    ),
    "notebook": (
        "notebook",
        "Write a Jupyter notebook that explores a dataset's landscape and exports a chosen subset "
        "of frames (as cryodrgn analyze does).",
    ),
    "summarize": (
        "summarize",
        "One index table across datasets: frames, classes, clusters, key metrics, result paths.",
    ),
    "phase": (
        "phase",
        "Phase retrieval of 3D volumes or 2D averages (DM, RAAR, HIO, ER with shrink-wrap) and "
        "particle volumes.",
    ),
    "train-phaser": (
        "train_phaser",
        "Train the neural phaser (3D U-Net on the Patterson map) on synthetic particle volumes.",
    ),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """cryoDRGN-style help: the description and example as written, each option's default once
    (not for required options, not when None or when the help already states it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.required or default is None or default is argparse.SUPPRESS
                or default is False or "default" in text or "%(default)" in text
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


#: Sphinx/RST markup that a terminal should not show
_MARKUP = ((re.compile(r":(?:mod|func|class|meth|data|attr):`~?([^`]+)`"), r"\1"),
           (re.compile(r"``([^`]+)``"), r"\1"))


def description(docstring: str | None, summary: str) -> str:
    """A subcommand's description: the first paragraph of its module docstring (1-3
    sentences), Sphinx markup removed; the summary when there is none."""
    text = (docstring or summary).strip().split("\n\n")[0]
    for pattern, plain in _MARKUP:
        text = pattern.sub(plain, text)
    return text


def command_module(name: str):
    return importlib.import_module(f"spiscape.commands.{COMMANDS[name][0]}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(
        prog="spiscape",
        allow_abbrev=False,
        description="Map the structural landscape of heterogeneous samples measured by X-ray "
        "single particle imaging. Every stage of the pipeline is a subcommand.",
    )
    parser.add_argument("--version", action="version", version=f"spiscape {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        sub_parser = sub.add_parser(
            name, help=summary, formatter_class=HelpFormatter,
            allow_abbrev=False,  # `--num-frame` is an error, not --num-frames
        )
        if command is not None and name != command:
            continue
        module = command_module(name)
        sub_parser.description = description(module.__doc__, summary)
        example = getattr(module, "EXAMPLE", "").strip()
        if example:
            sub_parser.epilog = "Example:\n" + textwrap.indent(example, "  ")
        add_common_args(sub_parser)
        module.add_args(sub_parser)
        sub_parser.set_defaults(_main=module.main, _outputs=getattr(module, "OUTPUTS", {}))
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
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((word for word in argv if not word.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        check_outputs(args)
        setup_logging(args.verbose, args.log_file)
        result = args._main(args)
    except SpiscapeError as exc:
        logging.getLogger("spiscape").debug("error detail", exc_info=True)
        print(f"spiscape {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the checks could not foresee (disk full, permissions, ...)
        logging.getLogger("spiscape").debug("error detail", exc_info=True)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"spiscape {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    return int(result or 0)


def check_outputs(args) -> None:
    """Every output a command declares (its module's ``OUTPUTS``), and the log file, checked
    before any work: a directory where a file goes, a file where a folder goes or in the path."""
    from spiscape.utils.atomic import check_output, check_output_dir

    for name, kind in {**args._outputs, "log_file": "file"}.items():
        value = getattr(args, name, None)
        if value is not None:
            (check_output if kind == "file" else check_output_dir)(value)
