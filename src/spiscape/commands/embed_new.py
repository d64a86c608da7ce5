"""Place unseen 2D averages into an existing landscape with the absolute-embedding regressor.

The common-line embedding is relative to the averages it was computed from; the regressor trained
by `spiscape embed --model` maps an average's rotation-invariant features to coordinates of that
embedding, so averages from a new bootstrap replicate, a subset or another run can be placed
without recomputing the common-line matrix. Each new average also gets the cluster whose
centroid is nearest. The averages must be on the same grid (size S) as the training ones.

Writes an HDF5 file with coords (A, k), labels (A,) and replicate/class (A,) copied from the
averages file; attributes model, averages, method ("regressor:" + the embedding's method).
With --embedding and --figure, draws the new averages (stars) over the existing landscape.
"""

from __future__ import annotations

import logging

import numpy as np

from spiscape.embed import figures
from spiscape.embed.clustering import nearest_cluster
from spiscape.errors import InputError
from spiscape.io.averages import read_averages
from spiscape.io.embedding import read_embedding, write_embedding

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out": "file", "figure": "file"}

#: shown under "Example" in ``spiscape embed-new -h``
EXAMPLE = """\
spiscape embed-new --model embedding_model.pt --averages new_averages.h5 \\
    --out new_coords.h5 --embedding embedding.h5 --figure placed.png
"""


def add_args(parser):
    parser.add_argument("--model", required=True,
                        help="embedding_model.pt written by `spiscape embed --model`")
    parser.add_argument("--averages", required=True, help="averages.h5 holding the new averages")
    parser.add_argument("--out", required=True, help="output HDF5 of the new coordinates")
    parser.add_argument("--embedding", default=None,
                        help="the existing embedding.h5, drawn underneath in --figure")
    parser.add_argument("--figure", default=None, help="PNG of the new averages in the landscape")


def main(args):
    from spiscape.embed.regressor import AbsoluteEmbedding

    model = AbsoluteEmbedding.load(args.model)
    averages = read_averages(args.averages)
    size = model.feature_params.size
    if averages.size != size:
        raise InputError(args.averages, f"averages of {averages.size}x{averages.size} "
                                        f"pixels, the regressor was trained on {size}x{size}")
    coords = model.predict(averages.intens, averages.support)
    labels = nearest_cluster(coords, model.centroids)
    log.info("placed %d averages; nearest clusters %s", coords.shape[0],
             np.bincount(labels[labels >= 0]).tolist() if labels.size else [])
    if args.figure:
        if args.embedding:
            old = read_embedding(args.embedding)
            if old.coords.shape[1] != coords.shape[1]:
                raise InputError(args.embedding, f"{old.coords.shape[1]} components, the "
                                                 f"regressor gives {coords.shape[1]}")
            figures.embedding_scatter(old.coords, old.labels, args.figure,
                                      extra=(coords, labels),
                                      title="new averages (stars) in the existing landscape")
        else:
            figures.embedding_scatter(coords, labels, args.figure,
                                      title="new averages placed by the regressor")
    write_embedding(args.out, {"coords": coords, "labels": labels,
                               "replicate": averages.replicate, "class": averages.klass},
                    {"model": str(args.model), "averages": str(args.averages),
                     "method": f"regressor:{model.method}", "components": coords.shape[1]})
    log.info("wrote %s", args.out)
