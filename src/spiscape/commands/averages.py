"""Gather the 2D class averages of all bootstrap replicates into averages.h5, with figures.

Classes chosen by fewer than --min-frames frames (summed occupancy) are left out: an empty class
keeps its random initial model and would only add noise to the common-line landscape. Draws the
EMC convergence of every replicate and a montage of the averages (log scale).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from spiscape.emc import figures
from spiscape.emc.averages import collect_averages
from spiscape.io.averages import write_averages

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out": "file", "convergence_figure": "file", "montage_figure": "file"}

#: shown under "Example" in ``spiscape averages -h``
EXAMPLE = """\
spiscape averages --replicates emc/rep0.h5 emc/rep1.h5 --out averages.h5
"""


def add_args(parser):
    parser.add_argument("--replicates", nargs="+", required=True,
                        help="classify2d replicate files (rep0.h5 rep1.h5 ...)")
    parser.add_argument("--out", required=True, help="output averages.h5")
    parser.add_argument("--min-frames", type=float, default=5.0,
                        help="smallest summed occupancy for a class to be kept")
    parser.add_argument("--convergence-figure", default=None, help="PNG of the EMC convergence")
    parser.add_argument("--montage-figure", default=None, help="PNG of the class averages")


def main(args):
    if args.convergence_figure:
        figures.convergence_figure(args.replicates, Path(args.convergence_figure))
    # averages.h5 last: the figures must not be missing when it looks finished
    result = collect_averages(args.replicates, args.min_frames)
    if args.montage_figure:
        order = np.argsort(-result.frames)
        titles = [f"r{result.replicate[k]} c{result.klass[k]} n={result.frames[k]:.0f}"
                  for k in order]
        figures.montage_figure(result.intens[order], Path(args.montage_figure), titles)
    write_averages(Path(args.out), result, args.replicates, args.min_frames)
    log.info("%d averages from %d replicates -> %s", result.count,
             len(args.replicates), args.out)
