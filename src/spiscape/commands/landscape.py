"""Per-frame landscape: each frame's embedding coordinates and cluster from its classes.

A frame's coordinates are the occupancy-weighted mean of the embedding coordinates of the class
averages it belongs to (weights renormalised over the classes kept in averages.h5), averaged
over the bootstrap replicates that drew it; its cluster is the occupancy-weighted vote of those
averages' clusters. Frames never placed get NaN coordinates and label -1. The result, frames.h5
(clpca (N, k), label (N,), latent (N, z): the VAE's per-frame latents with --frame-latent, else
one all-NaN column), is what `spiscape select` picks frames from. With --truth (simulated data)
the landscape is scored: adjusted Rand index of the frames' clusters against cube / sphere /
contaminant (melting frames left out), and the best Spearman |rho| of a component with the
melting parameter t among non-contaminant frames.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from spiscape.embed import figures
from spiscape.embed.landscape import frame_coordinates
from spiscape.errors import InputError
from spiscape.io.averages import read_averages
from spiscape.io.embedding import read_embedding
from spiscape.io.frames import write_landscape
from spiscape.io.replicate import read_replicates
from spiscape.io.volumes import read_frame_latent
from spiscape.utils.args import at_least
from spiscape.utils.atomic import atomic_path

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out": "file", "metrics_json": "file", "figure_dir": "folder"}

#: shown under "Example" in ``spiscape landscape -h``
EXAMPLE = """\
spiscape landscape --embedding embedding.h5 --averages averages.h5 \\
    --replicates emc/rep0.h5 emc/rep1.h5 --photons data/photons.h5 --out frames.h5
"""


def add_args(parser):
    parser.add_argument("--embedding", required=True, help="embedding.h5 of `spiscape embed`")
    parser.add_argument("--averages", required=True, help="averages.h5 the embedding was made of")
    parser.add_argument("--replicates", nargs="+", required=True,
                        help="classify2d replicate files (rep0.h5 rep1.h5 ...)")
    parser.add_argument("--out", required=True, help="output frames.h5")
    parser.add_argument("--num-frames", type=at_least(1), default=None,
                        help="frames in the dataset N (default: from --photons or --truth, else "
                             "the largest frame index in the replicates + 1)")
    parser.add_argument("--photons", nargs="+", default=None,
                        help="the dataset's photon files, to count its frames")
    parser.add_argument("--truth", default=None,
                        help="truth.h5 of a simulated dataset: score the landscape")
    parser.add_argument("--metrics-json", default=None,
                        help="write the scores against the truth (and frame counts) here")
    parser.add_argument("--frame-latent", default=None,
                        help="vae/frame_latent.h5: the frames' VAE latents, copied to frames.h5")
    parser.add_argument("--figure-dir", default=None, help="folder for the figures (PNG)")


def dataset_size(args, reps) -> int:
    largest = max(int(r.frames.max()) for r in reps if r.frames.size) + 1
    if args.num_frames is not None:
        count, source = args.num_frames, "--num-frames"
    elif args.photons:
        from spiscape.io import count_frames

        count, source = count_frames(args.photons), args.photons[0]
    elif args.truth:
        from spiscape.io.truth import read_truth

        count, source = read_truth(args.truth, volumes=False).num_frames, args.truth
    else:
        log.warning("dataset size not given: taking N = largest frame index + 1 = %d", largest)
        return largest
    if count < largest:
        raise InputError(source, f"{count} frames, but the replicates name frame {largest - 1}")
    return int(count)


def main(args):
    embedding = read_embedding(args.embedding)
    averages = read_averages(args.averages, with_intens=False)
    if averages.count != embedding.coords.shape[0]:
        raise InputError(args.embedding, f"{embedding['coords'].shape[0]} averages embedded but "
                                         f"{args.averages} holds {averages.count}")
    reps = read_replicates(args.replicates)
    known = set(np.unique(averages.replicate).tolist())
    if not known & {r.number for r in reps}:
        raise InputError(args.replicates[0], f"none of these replicates "
                                             f"({[r.number for r in reps]}) made the averages "
                                             f"(replicates {sorted(known)})")
    num_frames = dataset_size(args, reps)
    result = frame_coordinates(num_frames, reps, averages.replicate, averages.klass,
                               embedding.coords, embedding.labels)
    placed = int(np.sum(result["num_replicates"] > 0))
    log.info("%d of %d frames placed in the landscape; cluster sizes %s", placed, num_frames,
             np.bincount(result["label"][result["label"] >= 0]).tolist())
    summary = {"frames_total": num_frames, "frames_placed": placed,
               "cluster_sizes": np.bincount(result["label"][result["label"] >= 0]).tolist()}
    truth = None
    if args.truth:
        from spiscape.io.truth import read_truth
        from spiscape.metrics.landscape import score_landscape

        truth = read_truth(args.truth, volumes=False)
        if truth.num_frames != num_frames:
            raise InputError(args.truth, f"{truth.num_frames} frames, the dataset has "
                                         f"{num_frames}")
        summary.update(score_landscape(result["coords"], result["label"], truth.label, truth.t))
        log.info("populations ARI %.3f; best Spearman |rho| with t %.3f (component %s)",
                 summary["population_ari"]["ari"], summary["melting_spearman"]["best_abs_rho"],
                 summary["melting_spearman"]["best_component"])
    if args.figure_dir:
        folder = Path(args.figure_dir)
        prefix = "PC" if embedding.method == "pca" else f"{embedding.method} "
        figures.frame_scatter(result["coords"], result["label"], folder / "frames_clusters.png",
                              prefix, "cluster", title="frames by cluster")
        if truth is not None:
            figures.frame_scatter(result["coords"], truth.label, folder / "frames_truth.png",
                                  prefix, "label", names=truth.label_names,
                                  title="frames by true population")
            figures.frame_scatter(result["coords"], truth.t, folder / "frames_t.png", prefix,
                                  "value", title="frames by melting parameter t (grey: "
                                                 "contaminants)",
                                  colour_label="melting parameter t (0 cube, 1 sphere)")
    if args.metrics_json:
        with atomic_path(args.metrics_json) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
    attrs = {"method": embedding.method, "embedding": str(args.embedding),
             "averages": str(args.averages),
             "replicates": json.dumps([str(p) for p in args.replicates]),
             "photons": json.dumps([str(p) for p in args.photons or []])}
    latent = None
    if args.frame_latent:
        latent = read_frame_latent(args.frame_latent, num_frames)
        attrs["frame_latent"] = str(args.frame_latent)
    write_landscape(args.out, result, attrs, latent)
    log.info("wrote %s", args.out)
