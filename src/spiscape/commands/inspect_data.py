"""Check a dataset: validate photons against the detector, summarise the frames, draw figures.

Reads the photon files a chunk at a time (any size fits in memory) and writes summary.json,
the virtual powder pattern, the photons-per-frame histogram and the radial profile. With
--truth (simulated data) the histogram is split by population and the summary counts them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from spiscape.errors import InputError
from spiscape.io import count_frames, iter_chunks, photon_files, read_detector
from spiscape.qc import accumulate, radial_profile
from spiscape.qc import figures as qc_figures
from spiscape.utils.args import at_least
from spiscape.utils.atomic import atomic_path

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out_dir": "folder"}

#: shown under "Example" in ``spiscape inspect -h``
EXAMPLE = """\
spiscape inspect --photons data/photons.h5 --detector data/detector.h5 --out-dir qc/
"""


def add_args(parser):
    parser.add_argument(
        "--photons", nargs="+", required=True,
        help="sparse photon files (Dragonfly .h5 or .emc), a text file listing them, or CXI",
    )
    parser.add_argument("--detector", required=True, help="Dragonfly detector file (.h5 or .dat)")
    parser.add_argument("--truth", default=None, help="truth.h5 of a simulated dataset (optional)")
    parser.add_argument("--out-dir", required=True, help="folder for summary.json and figures")
    parser.add_argument(
        "--chunk-frames", type=at_least(1), default=2000,
        help="frames read at a time (bounds memory)"
    )


def read_truth_labels(path, num_frames: int) -> tuple[np.ndarray, list[str]]:
    """Per-frame population labels and their names from a simulator truth file."""
    from spiscape.io.truth import read_truth

    truth = read_truth(path, volumes=False)
    labels, names = np.asarray(truth.label), truth.label_names
    if labels.shape != (num_frames,):
        raise InputError(
            path, f"has {labels.shape[0]} labels but the photons have {num_frames} frames"
        )
    return labels, list(names)


def main(args):
    out = Path(args.out_dir)
    detector = read_detector(args.detector)
    files = [p for spec in args.photons for p in photon_files(spec)]
    num_frames = count_frames(files)
    log.info("%d frames in %d file(s), detector with %d pixels", num_frames, len(files),
             detector.num_pix)
    if num_frames == 0:
        raise InputError(files[0], "holds no frames")

    with tqdm(total=num_frames, unit="frame", desc="inspect", disable=None) as bar:
        # read_photons inside iter_chunks checks num_pix against the detector on every file
        chunks = iter_chunks(files, args.chunk_frames, num_pix=detector.num_pix)
        stats = accumulate(chunks, detector.num_pix, progress=bar)
    summary = stats.summary(detector)
    summary["photon_files"] = [str(p) for p in files]
    summary["detector"] = str(args.detector)
    counts = stats.counts

    groups = None
    if args.truth:
        labels, names = read_truth_labels(args.truth, num_frames)
        groups = {name: counts[labels == i] for i, name in enumerate(names)}
        summary["populations"] = {name: int(v.size) for name, v in groups.items()}
        summary["photons_per_frame_by_population"] = {
            name: float(v.mean()) if v.size else None for name, v in groups.items()
        }

    for key in ("num_frames", "photons_per_frame_mean", "empty_frames"):
        log.info("%s: %s", key, summary[key])
    if summary["fraction_photons_on_bad_pixels"] > 0:
        log.warning("%.2g of the photons fall on bad pixels (mask 2); they are ignored",
                    summary["fraction_photons_on_bad_pixels"])

    qc_figures.powder_figure(stats.powder, detector, num_frames, out / "powder.png")
    qc_figures.photons_figure(counts, out / "photons_per_frame.png", groups)
    q, mean = radial_profile(stats.powder / num_frames, detector)
    qc_figures.radial_figure(q, mean, out / "radial_profile.png")
    # the summary is written last: its presence means the stage finished
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    log.info("wrote %s", out / "summary.json")
