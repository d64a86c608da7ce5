"""Gather the 2D class averages of all bootstrap replicates into averages.h5.

Classes chosen by fewer than --min-frames frames (summed occupancy) are left out: an empty class
keeps its random initial model and would only add noise to the common-line landscape.
"""

from __future__ import annotations

import logging

from spiscape.emc.averages import gather_averages

log = logging.getLogger(__name__)


def add_args(parser):
    parser.add_argument("--replicates", nargs="+", required=True,
                        help="classify2d replicate files (rep0.h5 rep1.h5 ...)")
    parser.add_argument("--out", required=True, help="output averages.h5")
    parser.add_argument("--min-frames", type=float, default=5.0,
                        help="smallest summed occupancy for a class to be kept")


def main(args):
    result = gather_averages(args.replicates, args.out, args.min_frames)
    log.info("%d averages from %d replicates -> %s", result["intens"].shape[0],
             len(args.replicates), args.out)
