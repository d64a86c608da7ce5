"""Place frames on the landscape of an existing dataset, without re-classifying them.

Each frame gets its most probable reference average and in-plane rotation, its coordinates in
the reference's landscape (its averages' coordinates weighted by the frame's probabilities), its
cluster, its scale and how well the best view explains it (loglik_per_photon), from an E-step
against the reference's class averages at the β its EMC ended with. Frames are read in blocks,
so the memory does not grow with the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from spiscape.utils.args import at_least

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out": "file"}

#: shown under "Example" in ``spiscape place -h``
EXAMPLE = """\
spiscape place --reference results/demo --photons run0043.h5 --detector det.h5 \\
    --out results/run0043_on_demo.h5
"""


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


def main(args):
    from spiscape.embed.place import Placer, Reference
    from spiscape.io import iter_chunks, read_detector
    from spiscape.io.placed import write_placed

    reference = Reference.from_results(args.reference)
    detector = read_detector(args.detector)
    placer = Placer(reference, detector)
    parts = []
    for start, chunk in iter_chunks(args.photons, args.block_frames, num_pix=detector.num_pix):
        parts.append(placer.place(chunk.to_dense()))
        log.info("placed frames %d-%d", start, start + chunk.num_frames - 1)
    if not parts:
        from spiscape.errors import InputError

        raise InputError(args.photons[0], "no frames to place")
    placed = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    placed["clpca"] = placed.pop("coords")
    write_placed(args.out, placed, {
        "reference": str(Path(args.reference)), "detector": str(args.detector),
        "photons": json.dumps([str(p) for p in args.photons])})
    counts = np.unique(placed["label"], return_counts=True)
    log.info("%d frames placed on %s; clusters %s -> %s", len(placed["label"]), args.reference,
             dict(zip(counts[0].tolist(), counts[1].tolist(), strict=True)), args.out)
    return 0
