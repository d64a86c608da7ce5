"""Orientation and gain of each 2D class average against Ewald slices of a reference intensity.

Each average is correlated with the reference's slices on the Ewald sphere over a near-uniform
rotation grid (super-Fibonacci spiral, --step-deg apart) restricted to the asymmetric unit of
the point group; the best grid rotations are refined on finer local grids (--refine-deg). The CC
compares log intensities (log(I + 0.1 x median), centred) over the measured grid points only
(the averages' `support`): raw intensities are dominated by the few central pixels. The gain is
the best CC over the mean CC over all rotations: about 1 for a sphere-like average, higher the
more clearly the average is one orientation of the reference (the paper's "cubicness").

The reference is an ideal cube (--size-nm = edge; the paper used 42 nm), an ideal sphere
(--size-nm = diameter; nothing to orient: identity and gain 1 are reported) or a 3D intensity
file (--reference-file: HDF5 `intens (N,N,N)` centred on voxel N // 2 with attribute
`q_per_voxel_inv_nm`). q per detector pixel comes from --truth (simulated data) or --q-per-pixel
(pixel size x binning / (wavelength x distance), in 1/nm).

Writes --out: `quaternion (A,4)` scalar first (w, x, y, z), w >= 0, in the point group's
fundamental zone, such that average a shows I(R_a q) (the simulator's convention); `cc (A,)`,
`gain (A,)`, `mean_cc (A,)`, `grid_cc (A,)`, with the settings as attributes; and, first,
--figure: the gain histogram and a few averages beside their best-matching reference slices.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from spiscape.backend import get_array_module
from spiscape.errors import ConfigError
from spiscape.io import read_detector
from spiscape.io.averages import read_averages
from spiscape.io.orientation import write_orientation
from spiscape.orient import rotations as rot
from spiscape.orient.search import best_slices, fit_size, orient_averages, size_range
from spiscape.orient.slices import AnalyticReference, ewald_points, read_reference_volume
from spiscape.utils.args import at_least, auto_or_number, number_in

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out": "file", "figure": "file"}

#: shown under "Example" in ``spiscape orient -h``
EXAMPLE = """\
spiscape orient --averages averages.h5 --detector data/detector.h5 \\
    --q-per-pixel 0.0055 --out orientation.h5 --figure orientation.png
"""

QUATERNION_CONVENTION = ("scalar-first (w, x, y, z), w >= 0, fundamental zone of the point "
                         "group; average a shows I(R_a q) at its grid points' Ewald q")


def add_args(parser):
    parser.add_argument("--averages", required=True, help="averages.h5 of `spiscape averages`")
    parser.add_argument("--detector", required=True,
                        help="Dragonfly detector file (for detd and ewald_rad)")
    scale = parser.add_mutually_exclusive_group(required=True)
    scale.add_argument("--truth", default=None,
                       help="truth.h5 of a simulated dataset (q_per_voxel_inv_nm)")
    scale.add_argument("--q-per-pixel", type=number_in(0, low_open=True), default=None,
                       help="q step of one detector pixel at the centre, in 1/nm")
    parser.add_argument("--out", required=True, help="output orientation.h5")
    parser.add_argument("--reference", choices=["cube", "sphere"], default=None,
                        help="analytic reference (default cube unless --reference-file)")
    parser.add_argument("--size-nm", type=auto_or_number(), default=42.0,
                        help="cube edge or sphere diameter of the analytic reference, nm, or "
                             "'auto': the size whose slices match the averages best (a scan "
                             "from 3 fringes on the detector to an oversampling of 2)")
    parser.add_argument("--reference-file", default=None,
                        help="3D intensity HDF5 (intens (N,N,N), attr q_per_voxel_inv_nm), or "
                             "an emc3d.h5 with --reference-model")
    parser.add_argument("--reference-model", type=at_least(0), default=None,
                        help="with an emc3d.h5 --reference-file: the model to orient against "
                             "(e.g. its cube model)")
    parser.add_argument("--point-group", default="m-3m", choices=list(rot.POINT_GROUPS),
                        help="symmetry of the reference (m-3m: cube; 1: none)")
    parser.add_argument("--step-deg", type=number_in(0, 90, low_open=True), default=3.0,
                        help="spacing of the rotation grid, degrees")
    parser.add_argument("--refine-deg", type=number_in(0), default=1.0,
                        help="finest spacing of the local refinement, degrees (0: no refinement)")
    parser.add_argument("--floor", type=number_in(0, low_open=True), default=0.1,
                        help="log transform floor, as a fraction of each image's median")
    parser.add_argument("--candidates", type=at_least(1), default=2,
                        help="best grid rotations refined per average")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                        help="where to slice and correlate (gpu: CuPy)")
    parser.add_argument("--figure", default=None, help="PNG: gain histogram and best matches")


def q_per_pixel_from(args) -> float:
    if args.q_per_pixel is not None:
        return float(args.q_per_pixel)
    from spiscape.io.truth import read_q_per_voxel

    return read_q_per_voxel(args.truth)


def make_reference(args, q_per_pixel: float, max_q: float):
    if args.reference_file and args.reference:
        raise ConfigError("give either --reference or --reference-file, not both")
    if args.reference_file:
        reference = read_reference_volume(args.reference_file, q_per_pixel,
                                          args.reference_model)
        if max_q > reference.reach():
            log.warning("%s reaches |q| = %.1f pixels but the averages extend to %.1f: the "
                        "corners read 0", args.reference_file, reference.reach(), max_q)
        return reference
    return AnalyticReference(args.reference or "cube", args.size_nm, q_per_pixel)


#: the size is fitted on the rings that hold this share of the averages' intensity: beyond
#: them few photons land and the angular pattern is noise (at 400 photons per frame the fit on
#: every ring found a 20 nm cube for a 48 nm one; on the rings of 90, 95 or 98 % it was within
#: 2.5 % of the truth on three validation sets)
SIZE_FIT_INTENSITY = 0.95


def signal_rings(intens, support, points, share: float = SIZE_FIT_INTENSITY) -> np.ndarray:
    """The measured grid points inside the radius that holds ``share`` of the mean average's
    intensity."""
    qnorm = np.linalg.norm(points, axis=1).reshape(support.shape)
    mean = np.clip(np.asarray(intens, dtype=np.float64).mean(axis=0), 0, None)
    radii = qnorm[support]
    order = np.argsort(radii)
    cumulative = np.cumsum(mean[support][order])
    if cumulative[-1] <= 0:
        return support
    cut = radii[order][min(np.searchsorted(cumulative, share * cumulative[-1]), order.size - 1)]
    return support & (qnorm <= cut)


def auto_size(args, intens, support, points, q_per_pixel: float, max_q: float, xp) -> float:
    """--size-nm auto: the analytic reference's size fitted to the averages (fit_size) on the
    rings that hold most of their intensity (signal_rings)."""
    if args.reference_file:
        raise ConfigError("--size-nm auto fits an analytic reference; a --reference-file has "
                          "its own size")
    kind = args.reference or "cube"
    low, high = size_range(q_per_pixel, max_q)
    sizes = np.exp(np.arange(np.log(low), np.log(high), np.log(1.04)))
    group = args.point_group if kind == "cube" else "1"
    rings = signal_rings(intens, support, points)
    size, scores = fit_size(intens, rings, points,
                            lambda s: AnalyticReference(kind, s, q_per_pixel), sizes, group,
                            xp=xp)
    log.info("reference size fitted to the averages: %s %.1f nm (scanned %.1f-%.1f nm on the "
             "rings to |q| = %.1f pixels, which hold %.0f %% of the intensity; mean best CC "
             "%.3f)", kind, size, low, high,
             float(np.linalg.norm(points[rings.reshape(-1)], axis=1).max()),
             100 * SIZE_FIT_INTENSITY, scores[size])
    return size


def main(args):
    averages = read_averages(args.averages)
    intens, support = averages.intens, averages.support
    det = read_detector(args.detector)
    q_per_pixel = q_per_pixel_from(args)
    size = intens.shape[1]
    points = ewald_points(size, det.detd, det.ewald_rad)
    max_q = float(np.linalg.norm(points[support.reshape(-1)], axis=1).max())
    xp = get_array_module(args.device)
    if args.size_nm == "auto":
        args.size_nm = auto_size(args, intens, support, points, q_per_pixel, max_q, xp)
    reference = make_reference(args, q_per_pixel, max_q)
    log.info("%d averages (%d x %d, %d measured points) against %s, point group %s, on %s",
             intens.shape[0], size, size, int(support.sum()), reference.describe(),
             args.point_group, "GPU" if xp is not np else "CPU")
    result = orient_averages(intens, support, points, reference, args.point_group,
                             args.step_deg, args.refine_deg, args.floor, args.candidates, xp)
    if args.figure:
        slices = best_slices(reference, points, result.quaternion).reshape(intens.shape)
        orientation_figure(intens, slices, support, result, Path(args.figure))
    save_orientation(Path(args.out), result, reference, q_per_pixel, args)
    finite = np.isfinite(result.gain)
    log.info("gain: median %.3f, range %.3f-%.3f; %.1f s -> %s",
             float(np.median(result.gain[finite])) if finite.any() else float("nan"),
             float(np.nanmin(result.gain)), float(np.nanmax(result.gain)),
             result.info.get("seconds", 0.0), args.out)
    return 0


def save_orientation(path: Path, result, reference, q_per_pixel: float, args) -> None:
    """``orientation.h5`` (:mod:`spiscape.io.orientation`) of a search result."""
    datasets = {key: getattr(result, key) for key in ("quaternion", "cc", "gain", "mean_cc",
                                                       "grid_cc")}
    write_orientation(path, datasets, {
        "reference": reference.kind, "reference_file": str(args.reference_file or ""),
        "size_nm": float(reference.size_nm), "point_group": args.point_group,
        "step_deg": float(args.step_deg), "refine_deg": float(args.refine_deg),
        "num_rotations": int(result.num_rotations), "transform": result.info["transform"],
        "floor": float(args.floor), "q_per_pixel_inv_nm": float(q_per_pixel),
        "quaternion_convention": QUATERNION_CONVENTION, "averages": str(args.averages),
        "note": result.info.get("note", ""),
        "info": json.dumps({k: v for k, v in result.info.items()
                            if isinstance(v, (int, float, str))}),
    })


def orientation_figure(intens, slices, support, result, path: Path, count: int = 5) -> None:
    """Gain histogram, and averages (top) above their best reference slices (bottom), log."""
    from spiscape.plotting import plt, save

    gain = result.gain
    order = np.argsort(-np.where(np.isfinite(gain), gain, -np.inf), kind="stable")
    picks = order[np.unique(np.linspace(0, len(order) - 1, min(count, len(order))).astype(int))]
    fig = plt.figure(figsize=(3.2 + 2.0 * len(picks), 4.2))
    grid = fig.add_gridspec(2, len(picks) + 1, width_ratios=[1.6] + [1.0] * len(picks))
    ax = fig.add_subplot(grid[:, 0])
    finite = gain[np.isfinite(gain)]
    ax.hist(finite, bins=max(5, min(30, len(finite) // 3 or 5)), color="0.4")
    ax.set_xlabel("gain (best CC / mean CC)")
    ax.set_ylabel("averages")
    ax.yaxis.get_major_locator().set_params(integer=True)  # counts
    for col, a in enumerate(picks, start=1):
        for row, (image, title) in enumerate(
                [(intens[a], f"#{a} gain {gain[a]:.2f}"), (slices[a], f"CC {result.cc[a]:.2f}")]):
            sub = fig.add_subplot(grid[row, col])
            shown = np.ma.masked_where(~support | (image <= 0), image)
            sub.imshow(np.ma.log10(shown).T, origin="lower", cmap="magma")
            sub.set_title(title, fontsize=8)
            sub.set_xticks([])
            sub.set_yticks([])
    fig.suptitle("averages (top) and best-matching reference slices (bottom), log scale",
                 fontsize=9)
    save(fig, path)
