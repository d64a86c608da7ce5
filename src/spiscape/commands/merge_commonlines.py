"""Merge common-line tiles into the symmetric similarity matrix commonlines.h5.

Checks that every tile of the plan is present exactly once and that all come from the same
averages (checksum) with the same sampling parameters; fails with one line naming the bad tile
otherwise. The optional figure shows the matrix in hierarchical-clustering order.
"""

from __future__ import annotations

import logging

from spiscape.commonlines.tiles import cc_figure, merge_tiles
from spiscape.io.commonlines import read_tile, write_commonlines

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out": "file", "figure": "file"}

#: shown under "Example" in ``spiscape merge-commonlines -h``
EXAMPLE = """\
spiscape merge-commonlines --tiles tile0.h5 tile1.h5 tile2.h5 tile3.h5 \\
    --out commonlines.h5 --figure cc.png
"""


def add_args(parser):
    parser.add_argument("--tiles", nargs="+", required=True,
                        help="tile files written by 'spiscape commonlines --tile K'")
    parser.add_argument("--out", required=True, help="output commonlines.h5")
    parser.add_argument("--figure", default=None, help="PNG of the CC matrix")


def main(args):
    merged = merge_tiles([read_tile(path) for path in args.tiles])
    if args.figure:
        cc_figure(merged, args.figure)
    write_commonlines(args.out, merged)
    log.info("%d tiles -> %d x %d common-line matrix %s", len(args.tiles), *merged["cc"].shape,
             args.out)
    return 0
