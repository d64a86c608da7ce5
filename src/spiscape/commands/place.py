"""Place frames on the landscape of an existing dataset, without re-classifying them.

Each frame gets its most probable reference average and in-plane rotation, its coordinates in
the reference's landscape (its averages' coordinates weighted by the frame's probabilities), its
cluster, its scale, how well the best view explains it (loglik_per_photon) and whether it is
unlike anything the reference holds (misfit, outlier; the threshold calibrated on a sample of
the reference's own frames), from an E-step against the reference's class averages at the β its
EMC ended with. Frames are read in blocks, so the memory does not grow with the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from spiscape.utils.args import at_least, number_in

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out": "file", "figure": "file"}

#: shown under "Example" in ``spiscape place -h``
EXAMPLE = """\
spiscape place --reference results/demo --photons run0043.h5 --detector det.h5 \\
    --out results/run0043_on_demo.h5
spiscape place --reference results/demo --photons incoming/ --detector det.h5 \\
    --out live/placed.h5 --follow       # while files arrive; Ctrl-C stops, rerun resumes
"""

#: photon files a watched folder may hold
PHOTON_SUFFIXES = (".h5", ".hdf5", ".emc", ".cxi")


def add_args(parser):
    parser.add_argument("--reference", required=True,
                        help="the results folder of a dataset whose landscape the frames are "
                             "placed on (averages.h5, embedding.h5, classify2d/)")
    parser.add_argument("--photons", nargs="+", required=True,
                        help="photon files (or a list file) of the frames to place")
    parser.add_argument("--detector", required=True,
                        help="their detector file (the averages' grid must hold its pixels)")
    parser.add_argument("--out", required=True, help="output placed.h5")
    parser.add_argument("--block-frames", type=at_least(1), default=2000,
                        help="frames placed at a time (bounds the memory)")
    parser.add_argument("--outlier-quantile", type=number_in(0, 1, low_open=True,
                                                              high_open=True), default=0.99,
                        help="flag frames whose misfit exceeds this quantile of the reference's "
                             "own frames' (about 1 - q of frames like the reference's are "
                             "flagged)")
    parser.add_argument("--calibration-frames", type=at_least(1), default=2000,
                        help="reference frames (evenly spread over its photon files) placed to "
                             "set the outlier threshold")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                        help="where the frames x views product runs (gpu: CuPy)")
    parser.add_argument("--figure", default=None,
                        help="PNG: the placed frames over the reference's (and, with --follow, "
                             "the clusters' shares as frames arrive; an HTML page beside --out "
                             "shows it and reloads itself)")
    parser.add_argument("--follow", action="store_true",
                        help="keep watching --photons (a folder, or a list file) for new files and "
                             "new frames, place them as they come and append them to --out (each "
                             "write complete: a reader never sees half a batch); stops on "
                             "SIGINT/SIGTERM after the batch in hand, and a rerun resumes where "
                             "it stopped. Files must appear complete (written elsewhere, then "
                             "moved in)")
    parser.add_argument("--poll-seconds", type=number_in(0, low_open=True), default=2.0,
                        help="with --follow: how often to look for new frames")
    parser.add_argument("--max-idle-seconds", type=number_in(0, low_open=True), default=None,
                        help="with --follow: stop after this long without new frames (default: "
                             "never)")


def main(args):
    from spiscape.embed.place import Placer, Reference
    from spiscape.io import read_detector

    reference = Reference.from_results(args.reference)
    detector = read_detector(args.detector)
    check_geometry(reference.detector_path, detector, args.detector)
    from spiscape.backend import get_array_module

    placer = Placer(reference, detector, args.detector, xp=get_array_module(args.device))
    calibrate(placer, reference, detector.num_pix, args)
    if args.follow:
        return follow(args, placer, detector.num_pix)
    from spiscape.io import iter_chunks

    parts = []
    for start, chunk in iter_chunks(args.photons, args.block_frames, num_pix=detector.num_pix):
        parts.append(_place(placer, chunk))
        log.info("placed frames %d-%d", start, start + chunk.num_frames - 1)
    if not parts:
        from spiscape.errors import InputError

        raise InputError(args.photons[0], "no frames to place")
    if args.figure:  # before the placed frames: a failure leaves no finished-looking output
        draw(args, parts, [])
    save(args, parts, {}, placer.outlier_threshold)
    return 0


def calibrate(placer, reference, num_pix: int, args) -> None:
    """The outlier threshold from the reference's own photon files (named by its replicates);
    without them, a warning and no frame flagged (threshold NaN in the output)."""
    from spiscape.errors import InputError
    from spiscape.io import count_frames, read_photons

    files = [Path(p) for p in reference.photons]
    if not files or not all(p.exists() for p in files):
        log.warning("the reference's photon files %s are not all here: no outlier threshold, "
                    "no frame flagged", [str(p) for p in files])
        return
    try:
        total = count_frames(files)
        take = np.unique(np.linspace(0, total - 1, min(total, args.calibration_frames))
                         .astype(np.int64))
        sample = read_photons(files, frames=take, num_pix=num_pix).to_dense()
    except InputError as exc:
        raise InputError(exc.path, f"the reference's photons (for the outlier threshold): "
                                   f"{exc.problem}") from None
    sample = sample[sample[:, placer.used].sum(axis=1) > 0]
    threshold = placer.calibrate(sample, args.outlier_quantile)
    log.info("outlier threshold: misfit %.4g (quantile %g of %d reference frames)", threshold,
             args.outlier_quantile, len(sample))


def draw(args, parts, history) -> None:
    """The placement figure (see --figure) from the parts placed so far."""
    from spiscape.embed.figures import placed_figure
    from spiscape.io.frames import read_landscape

    reference = read_landscape(Path(args.reference) / "frames.h5")["clpca"]
    coords = np.concatenate([p["clpca"] for p in parts])
    labels = np.concatenate([p["label"] for p in parts])
    outlier = np.concatenate([p["outlier"] for p in parts])
    placed_figure(reference, coords, labels, args.figure,
                  history if args.follow and len(history) > 1 else None, outlier=outlier)


def _write_page(out: Path, figure, summary: dict, refresh: float) -> None:
    """``<out>.summary.html``: the summary and the figure, reloading itself every few seconds."""
    from spiscape.utils.atomic import atomic_path

    rows = "".join(f"<tr><td>cluster {c}</td><td>{100 * v:.1f} %</td></tr>"
                   for c, v in sorted(summary["cluster_fractions"].items()))
    rows += (f"<tr><td>outliers</td><td>{100 * summary.get('outlier_fraction', 0):.1f} %"
             "</td></tr>")
    import os

    image = (f'<img src="{os.path.relpath(Path(figure).resolve(), out.resolve().parent)}" '
             'width="720">' if figure else "")
    page = (f'<html><head><meta http-equiv="refresh" content="{max(1, round(refresh))}">'
            f"<title>spiscape place</title></head><body><h3>{summary['frames']} frames placed, "
            f"{summary.get('frames_per_second', 0)} frames/s</h3><table>{rows}</table>{image}"
            "</body></html>\n")
    with atomic_path(out.with_name(out.stem + ".summary.html")) as tmp:
        tmp.write_text(page)


def check_geometry(own, detector, detector_path) -> None:
    """The frames' detector must have the reference's geometry (distance and Ewald radius, in
    the detector file's units, within 1 %): averages of another q scale would place frames by
    the wrong fringes. Checked when the reference's replicate names (``own``) a detector file
    that exists."""
    from spiscape.errors import InputError
    from spiscape.io import read_detector

    if not own or not Path(own).exists():
        log.warning("the reference does not name an existing detector file: its geometry is "
                    "not compared with %s", detector_path)
        return
    ref = read_detector(own)
    for name in ("detd", "ewald_rad"):
        a, b = float(getattr(ref, name)), float(getattr(detector, name))
        if abs(a - b) > 0.01 * max(abs(a), abs(b)):
            raise InputError(detector_path, f"{name} {b:g} differs from the reference's {a:g} "
                                            f"({own}): another geometry, another q scale")


def _place(placer, chunk) -> dict:
    placed = placer.place(chunk.to_dense())
    placed["clpca"] = placed.pop("coords")
    return placed


def save(args, parts: list[dict], progress: dict, threshold: float) -> dict:
    """Write every placed frame so far to --out at once (atomically), and a summary beside it:
    each cluster's share of the frames, for a live view of what the sample is doing."""
    from spiscape.io.placed import write_placed

    placed = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    write_placed(args.out, placed, {
        "reference": str(Path(args.reference)), "detector": str(args.detector),
        "photons": json.dumps([str(p) for p in args.photons]),
        "progress": json.dumps(progress), "outlier_threshold": threshold,
        "outlier_quantile": args.outlier_quantile})
    values, counts = np.unique(placed["label"], return_counts=True)
    shares = {int(v): round(float(c) / len(placed["label"]), 4)
              for v, c in zip(values, counts, strict=True)}
    outliers = float(np.mean(placed["outlier"]))
    log.info("%d frames placed on %s; cluster shares %s; outliers %.1f %% -> %s",
             len(placed["label"]), args.reference, shares, 100 * outliers, args.out)
    return {"frames": int(len(placed["label"])), "cluster_fractions": shares,
            "outlier_fraction": round(outliers, 4)}


def _watched_files(spec: list[str]) -> list[Path]:
    """The photon files of a watched folder (sorted by name) or list file, as they are now."""
    from spiscape.io import photon_files

    files = []
    for item in spec:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if not p.name.startswith(".")
                                and p.suffix.lower() in PHOTON_SUFFIXES))
        else:
            files.extend(photon_files([item]))
    return files


def follow(args, placer, num_pix: int) -> int:
    """Place frames as they arrive (see --follow); resume from --out's progress."""
    import signal
    import time

    from spiscape.errors import InputError
    from spiscape.io import count_frames, read_photons

    parts, progress, history = [], {}, []
    out = Path(args.out)
    if out.exists():
        from spiscape.io.placed import read_placed

        previous = read_placed(out)
        progress = json.loads(previous["attrs"].get("progress", "{}"))
        parts.append({k: previous[k] for k in previous if k != "attrs"})
        log.info("resuming: %d frames already placed in %s", len(previous["label"]), out)
    stop = {"now": False}

    def request_stop(signum, frame):
        stop["now"] = True
        log.info("signal %d: stopping after the batch in hand", signum)

    handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    idle_since, started, placed_now = time.monotonic(), time.monotonic(), 0
    try:
        while not stop["now"]:
            new = False
            for path in _watched_files(args.photons):
                try:
                    total = count_frames([path])
                except InputError as exc:  # not complete yet, or not a photon file
                    log.debug("skipping %s for now: %s", path, exc)
                    continue
                done = int(progress.get(str(path), 0))
                while done < total and not stop["now"]:
                    stop_at = min(done + args.block_frames, total)
                    chunk = read_photons([path], frames=np.arange(done, stop_at),
                                         num_pix=num_pix)
                    parts.append(_place(placer, chunk))
                    progress[str(path)] = done = stop_at
                    placed_now += chunk.num_frames
                    summary = save(args, parts, progress, placer.outlier_threshold)
                    summary["frames_per_second"] = round(
                        placed_now / max(time.monotonic() - started, 1e-9), 1)
                    _write_summary(out, summary)
                    history.append((summary["frames"], summary["cluster_fractions"]))
                    if args.figure:
                        draw(args, parts, history)
                    _write_page(out, args.figure, summary, max(args.poll_seconds, 2.0))
                    new = True
            if new:
                idle_since = time.monotonic()
            elif (args.max_idle_seconds is not None
                  and time.monotonic() - idle_since >= args.max_idle_seconds):
                log.info("no new frames for %.0f s: stopping", args.max_idle_seconds)
                break
            if not stop["now"]:
                time.sleep(args.poll_seconds)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return 0


def _write_summary(out: Path, summary: dict) -> None:
    """``<out>.summary.json``: frames so far, each cluster's share, frames per second."""
    from spiscape.utils.atomic import atomic_path

    with atomic_path(out.with_name(out.stem + ".summary.json")) as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
