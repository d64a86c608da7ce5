"""Common-line similarity of 2D class averages: one tile of the upper triangle, or all.

For every pair of averages, the lines through the centre of each (n_angles lines over [0, pi),
radii r_min..r_max pixels, bilinear interpolation, unmeasured pixels excluded) are transformed,
normalised (zero mean, unit norm) and correlated; the highest Pearson CC over all line pairs and
its two angles are kept. With --scale-range x (0.15 by default) the second average of each pair is
also scaled radially within 1/(1+x)..1+x and the best scale kept, so that particles of one shape
and a few per cent of size spread correlate as one population. With --tile K --num-tiles T only
tile K of the upper triangle is computed and written as a tile file for merge-commonlines;
without --tile the whole matrix is written as commonlines.h5. Definitions and file layouts:
spiscape.commonlines.polar and .tiles.
"""

from __future__ import annotations

import logging

from spiscape.commonlines import (
    PolarParams,
    compute_matrix,
    compute_tile,
    pairable_averages,
)
from spiscape.commonlines.polar import LAYOUTS, MISSING, SCALE_RANGE, TRANSFORMS
from spiscape.commonlines.tiles import cc_figure
from spiscape.errors import ConfigError
from spiscape.io.commonlines import write_commonlines, write_tile
from spiscape.utils.args import at_least, number_in

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out": "file", "figure": "file"}

#: shown under "Example" in ``spiscape commonlines -h``
EXAMPLE = """\
spiscape commonlines --averages averages.h5 --out commonlines.h5
spiscape commonlines --averages averages.h5 --out tile0.h5 --tile 0 --num-tiles 4
"""


def add_args(parser):
    d = PolarParams()
    parser.add_argument("--averages", required=True, help="averages.h5 (2D class averages)")
    parser.add_argument("--out", required=True,
                        help="output: a tile file with --tile, else commonlines.h5")
    parser.add_argument("--tile", type=at_least(0), default=None,
                        help="which tile of the upper triangle to compute (0-based); "
                             "omit for the whole matrix")
    parser.add_argument("--num-tiles", type=at_least(1), default=1,
                        help="number of tiles the upper triangle is cut into")
    parser.add_argument("--n-angles", type=at_least(1), default=d.n_angles,
                        help="lines per average over [0, pi)")
    parser.add_argument("--r-min", type=float, default=d.r_min,
                        help="innermost radius sampled (pixels; keep it outside the beamstop)")
    parser.add_argument("--r-max", default="auto",
                        help="outermost radius (pixels), or 'auto': the rim of the measured disc")
    parser.add_argument("--radial-step", type=float, default=d.radial_step,
                        help="spacing of the samples along a line (pixels)")
    parser.add_argument("--transform", choices=TRANSFORMS, default=d.transform,
                        help="intensity transform before correlation: log = log(1 + I/median), "
                             "none = raw intensities, radial = divided by the azimuthal mean")
    parser.add_argument("--lines", choices=LAYOUTS, default=d.lines,
                        help="friedel = half-lines averaged with their Friedel mates; "
                             "diameter = full lines through the centre (Dragonfly's sampling)")
    parser.add_argument("--missing", choices=MISSING, default=d.missing,
                        help="common = drop radii unmeasured at any angle (one product per "
                             "pair); overlap = exact Pearson over each line pair's overlap")
    parser.add_argument("--scale-range", type=number_in(0, 1, high_open=True),
                        default=SCALE_RANGE,
                        help="size search: the CC of a pair is the best over radial scalings of "
                             "the second average within 1/(1+x)..1+x, so that a population's "
                             "size spread does not split it (0: the paper's plain CC)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="gpu (CuPy) or cpu (NumPy); auto picks a GPU when one is usable")
    parser.add_argument("--batch-pairs", type=at_least(1), default=None,
                        help="pairs per batched product (default: 8 on a CPU, 2 with --missing "
                             "overlap, 2048 on a GPU)")
    parser.add_argument("--precision", choices=("float64", "float32"), default="float64",
                        help="arithmetic of the correlation; float32 is ~2x faster, CC to ~1e-6")
    parser.add_argument("--threads", type=at_least(0), default=0,
                        help="CPU threads (0: every core this job may use)")
    parser.add_argument("--figure", default=None,
                        help="PNG of the CC matrix (whole-matrix mode only)")


def params_from_args(args) -> PolarParams:
    if str(args.r_max).lower() == "auto":
        r_max = None
    else:
        try:
            r_max = float(args.r_max)
        except ValueError:
            raise ConfigError(f"--r-max must be a number or 'auto', got {args.r_max!r}") from None
    return PolarParams(n_angles=args.n_angles, r_min=args.r_min, r_max=r_max,
                       radial_step=args.radial_step, transform=args.transform, lines=args.lines,
                       missing=args.missing, scale_range=args.scale_range)


def main(args):
    params = params_from_args(args)
    if args.tile is None and args.num_tiles != 1:
        raise ConfigError("--num-tiles needs --tile (which tile to compute)")
    averages = pairable_averages(args.averages)
    if args.tile is not None:
        if args.figure:
            raise ConfigError("--figure draws the whole matrix; give it to merge-commonlines")
        result = compute_tile(averages, params, args.tile, args.num_tiles, args.device,
                              args.batch_pairs, args.precision, args.threads or None)
        write_tile(args.out, result, result["attrs"], result["replicate"], result["class"])
        log.info("tile %d/%d (%d pairs) -> %s", args.tile, args.num_tiles, result["i"].size,
                 args.out)
        return 0
    merged = compute_matrix(averages, params, args.device, args.batch_pairs, args.precision,
                            args.threads or None)
    if args.figure:
        cc_figure(merged, args.figure)
    write_commonlines(args.out, merged)
    log.info("%d x %d common-line matrix -> %s", *merged["cc"].shape, args.out)
    return 0
