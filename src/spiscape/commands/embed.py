"""Embed the common-line similarity matrix (CLPCA and others), cluster, train the regressor.

Each class average is described by its row of the common-line matrix (after Fisher's z-transform,
which spreads the correlations crowded near 1; --cc-transform none for the raw ones); PCA of the
centred rows (the CLPCA space of Zhuang, Ayyer et al., IUCrJ 2022; by default after the noise
correction of spiscape.embed.embedding, --noise-neighbours), or Isomap, spectral, t-SNE or
UMAP, places the averages in a few dimensions, where k-means, a Gaussian mixture or DBSCAN/HDBSCAN
groups them (the number of groups from --num-clusters, or chosen by silhouette/BIC). With
--replicates, a cluster whose parts share (almost) no frames is split (--split-shared-frames,
spiscape.embed.sharing): the EMC's frames tell apart objects whose common lines do not. With
--model, an MLP is trained from rotation-invariant features of the averages to their coordinates
(the absolute-embedding regressor used by embed-new). With --replicates, every bootstrap replicate
is embedded on its own and the landscapes compared over their shared frames (Procrustes
disparity); with --truth as well (simulated data), the averages are also drawn coloured by their
frames' true population and melting parameter.

Writes embedding.h5: coords (A, k), labels (A,) (-1: outlier of DBSCAN/HDBSCAN),
explained_variance (k,), explained_variance_ratio (k,), centroids (C, k) of the clusters,
replicate and class (A,) copied from averages.h5, reliability (A,) (the noise correction's
estimate, with --noise-neighbours > 0), with --truth truth_label (A,) (majority true
label of each average's frames) and truth_t (A,) (their mean t); attributes method,
method_params, cc_transform, components, cluster_method, num_clusters, seed, and metrics (JSON:
explained variance, cluster sizes and scores, bootstrap stability, regressor validation MSE).
The figures (--figure-dir): embedding.png, explained_variance.png, cluster_montage.png,
regressor.png (with --model) and embedding_truth.png (with --truth).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from spiscape.embed import clustering, figures
from spiscape.embed.embedding import (
    CC_TRANSFORMS,
    METHODS,
    NOISE_NEIGHBOURS,
    embed,
)
from spiscape.embed.landscape import average_truth, replicate_stability
from spiscape.embed.sharing import (
    SPLIT_SHARED_FRAMES,
    cluster_shares,
    membership_similarity,
    split_clusters,
)
from spiscape.errors import ConfigError, InputError
from spiscape.io.averages import read_averages
from spiscape.io.commonlines import read_commonlines
from spiscape.io.embedding import write_embedding
from spiscape.io.replicate import read_replicates
from spiscape.utils.args import at_least, auto_or_number, number_in
from spiscape.utils.atomic import atomic_path

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out": "file", "model": "file", "figure_dir": "folder"}

#: shown under "Example" in ``spiscape embed -h``
EXAMPLE = """\
spiscape embed --commonlines commonlines.h5 --averages averages.h5 \\
    --replicates emc/rep0.h5 emc/rep1.h5 --out embedding.h5 --model embedding_model.pt
"""


def add_embedding_args(parser) -> None:
    parser.add_argument("--method", choices=METHODS, default="pca",
                        help="embedding of the common-line rows: pca (the paper's CLPCA), isomap, "
                             "spectral, tsne, umap (needs umap-learn)")
    parser.add_argument("--components", type=at_least(1), default=3,
                        help="embedding dimensions k")
    parser.add_argument("--cc-transform", choices=CC_TRANSFORMS, default="fisher",
                        help="fisher: embed Fisher z = artanh(cc), which spreads the correlations "
                             "crowded near 1; none: the raw correlations (the paper's CLPCA)")
    parser.add_argument("--noise-neighbours", type=at_least(0), default=NOISE_NEIGHBOURS,
                        help="noise correction: divide each CC by sqrt(R_i R_j), the averages' "
                             "reliabilities fitted on each one's k best partners, so that the "
                             "number of frames behind an average is not a direction of the "
                             "landscape (0: off, the paper's CC)")
    parser.add_argument("--neighbors", type=at_least(1), default=None,
                        help="neighbours for isomap/spectral/umap (default about sqrt(A))")
    parser.add_argument("--perplexity", type=float, default=None,
                        help="t-SNE perplexity (default min(30, (A-1)/3))")


def add_args(parser):
    parser.add_argument("--commonlines", required=True,
                        help="commonlines.h5 with the common-line correlation matrix cc (A, A)")
    parser.add_argument("--averages", required=True, help="averages.h5 the matrix was made from")
    parser.add_argument("--out", required=True, help="output embedding.h5")
    parser.add_argument("--model", default=None,
                        help="train the absolute-embedding regressor and save it here "
                             "(embedding_model.pt)")
    parser.add_argument("--figure-dir", default=None, help="folder for the figures (PNG)")
    parser.add_argument("--replicates", nargs="+", default=None,
                        help="classify2d replicate files: bootstrap stability, and with --truth "
                             "the averages' true populations")
    parser.add_argument("--truth", default=None, help="truth.h5 of a simulated dataset")
    add_embedding_args(parser)
    parser.add_argument("--cluster", choices=clustering.METHODS, default="kmeans",
                        help="clustering of the embedded averages")
    parser.add_argument("--num-clusters", type=auto_or_number(minimum=1, kind=int), default="auto",
                        help="number of clusters, or 'auto' (silhouette for kmeans, BIC for gmm; "
                             "dbscan/hdbscan find it themselves)")
    parser.add_argument("--split-shared-frames", default=SPLIT_SHARED_FRAMES,
                        type=number_in(0, 1, high_open=True),
                        help="with --replicates: split a cluster whose parts share less than "
                             "this share of their frames' class memberships (different objects "
                             "that the common lines could not tell apart; "
                             "spiscape.embed.sharing); 0: off")
    parser.add_argument("--max-clusters", type=at_least(1), default=8,
                        help="largest number of clusters tried with --num-clusters auto")
    parser.add_argument("--eps", type=float, default=None,
                        help="DBSCAN neighbourhood radius (default from the data)")
    parser.add_argument("--min-samples", type=at_least(1), default=None,
                        help="DBSCAN min_samples / HDBSCAN min_cluster_size")
    parser.add_argument("--seed", type=at_least(0), default=1,
                        help="seed of every random choice (embedding, clustering, regressor)")
    parser.add_argument("--epochs", type=at_least(1), default=3000, help="regressor: most epochs")
    parser.add_argument("--patience", type=at_least(1), default=200,
                        help="regressor: stop after this many epochs without validation gain")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="regressor: Adam rate")
    parser.add_argument("--validation-fraction", default=0.2,
                        type=number_in(0, 1, low_open=True, high_open=True),
                        help="regressor: share of the averages held out for validation")


def _embed_fn(args):
    def run(cc):
        return embed(cc, args.method, args.components, args.seed, args.neighbors,
                     args.perplexity, args.cc_transform, args.noise_neighbours).coords
    return run


def main(args):
    from spiscape.embed.regressor import TrainParams, fit_absolute_embedding

    if args.truth and not args.replicates:
        raise ConfigError("--truth needs --replicates (the frames of each average)")
    cc = read_commonlines(args.commonlines)
    averages = read_averages(args.averages, with_intens=bool(args.model or args.figure_dir))
    if averages.count != cc.shape[0]:
        raise InputError(args.commonlines, f"cc is {cc.shape[0]}x{cc.shape[0]} but "
                                           f"{args.averages} holds {averages.count} averages")
    result = embed(cc, args.method, args.components, args.seed, args.neighbors, args.perplexity,
                   args.cc_transform, args.noise_neighbours)
    reliability = result.params.pop("reliability", None)
    if reliability is not None:
        log.info("noise correction over %d partners: reliability median %.3f (range %.3f..%.3f)",
                 args.noise_neighbours, float(np.median(reliability)), float(reliability.min()),
                 float(reliability.max()))
    log.info("%s embedding of %d averages; explained variance ratio %s", args.method,
             cc.shape[0], np.round(result.explained_variance_ratio, 3).tolist())
    groups = clustering.cluster(result.coords, args.cluster, args.num_clusters, args.seed,
                                args.max_clusters, args.eps, args.min_samples)
    log.info("%s: %d clusters, sizes %s", args.cluster, groups.num_clusters,
             np.bincount(groups.labels[groups.labels >= 0]).tolist())
    reps = read_replicates(args.replicates) if args.replicates else []
    num_frames = max((int(r.frames.max()) + 1 for r in reps if r.frames.size), default=0)
    splits, shares = split_by_shared_frames(args, groups, reps, averages, num_frames)
    metrics = {
        "explained_variance_ratio": result.explained_variance_ratio.tolist(),
        "clusters": {"method": groups.method, "num_clusters": groups.num_clusters,
                     "sizes": np.bincount(groups.labels[groups.labels >= 0]).tolist(),
                     "outliers": int(np.sum(groups.labels < 0)),
                     "scores": {str(k): v for k, v in groups.scores.items()},
                     "shared_frame_splits": splits},
    }
    truth_avg = None
    if reps:
        truth = None
        if args.truth:
            from spiscape.io.truth import read_truth

            truth = read_truth(args.truth, volumes=False)
            if truth.num_frames < num_frames:
                raise InputError(args.truth, f"{truth.num_frames} frames, but the replicates "
                                             f"name frame {num_frames - 1}")
            num_frames = truth.num_frames
        metrics["stability"] = replicate_stability(cc, reps, averages.replicate,
                                                   averages.klass, num_frames,
                                                   _embed_fn(args))
        log.info("bootstrap stability: Procrustes disparity %s", metrics["stability"]["pairs"])
        if truth is not None:
            truth_avg = average_truth(cc.shape[0], reps, averages.replicate, averages.klass,
                                      truth.label, truth.t, max(len(truth.label_names), 5))
            truth_avg["names"] = truth.label_names
    centres = clustering.centroids(result.coords, groups.labels)
    model = None
    if args.model:
        params = TrainParams(epochs=args.epochs, patience=args.patience,
                             learning_rate=args.learning_rate,
                             validation_fraction=args.validation_fraction, seed=args.seed)
        model = fit_absolute_embedding(averages.intens, averages.support, result.coords,
                                       params, args.method, centres)
        metrics["regressor"] = model.metrics
        log.info("regressor validation MSE per component %s (R^2 %s)",
                 np.round(model.metrics["validation_mse"], 4).tolist(),
                 np.round(model.metrics["validation_r2"], 3).tolist())
    if args.figure_dir:
        draw(Path(args.figure_dir), result, groups, averages, model, truth_avg)
    if model is not None:
        with atomic_path(args.model) as tmp:
            model.save(tmp)
    datasets = {"coords": result.coords, "labels": groups.labels,
                "explained_variance": result.explained_variance,
                "explained_variance_ratio": result.explained_variance_ratio,
                "centroids": centres, "replicate": averages.replicate, "class": averages.klass}
    if reliability is not None:
        datasets["reliability"] = reliability
    attrs = {}
    if shares is not None:
        datasets["shared_frames"] = shares
        attrs["split_shared_frames"] = args.split_shared_frames
    if truth_avg is not None:
        datasets.update(truth_label=truth_avg["majority"], truth_t=truth_avg["mean_t"])
        attrs["label_names"] = json.dumps(truth_avg["names"])
    attrs.update(method=args.method, method_params=json.dumps(result.params),
                 cc_transform=args.cc_transform, components=args.components,
                 cluster_method=args.cluster, num_clusters=groups.num_clusters, seed=args.seed,
                 commonlines=str(args.commonlines), averages=str(args.averages),
                 model=str(args.model or ""), metrics=json.dumps(metrics))
    write_embedding(args.out, datasets, attrs)
    log.info("wrote %s", args.out)


def split_by_shared_frames(args, groups, reps, averages, num_frames: int):
    """Split the clusters whose parts share (almost) no frames (spiscape.embed.sharing), in
    place in ``groups``; returns the splits made and the final clusters' shares (None when
    not measured)."""
    if args.split_shared_frames <= 0:
        return [], None
    if not reps:
        log.info("no --replicates: the clusters are not checked for frames they share")
        return [], None
    similarity = membership_similarity(averages.count, reps, averages.replicate,
                                       averages.klass, num_frames)
    labels, splits = split_clusters(similarity, groups.labels, args.split_shared_frames)
    for s in splits:
        log.info("shared frames: cluster %d split %d | %d averages, which share %.2g of their "
                 "frames (below %g): different objects", s["cluster"], *s["sizes"], s["share"],
                 args.split_shared_frames)
    if splits:
        groups.labels = clustering.relabel_by_size(labels)
        groups.num_clusters = int(groups.labels.max()) + 1
        log.info("%d clusters after the shared-frame check, sizes %s", groups.num_clusters,
                 np.bincount(groups.labels[groups.labels >= 0]).tolist())
    return splits, cluster_shares(similarity, groups.labels)


def draw(folder: Path, result, groups, averages, model, truth_avg) -> None:
    prefix = "PC" if result.method == "pca" else f"{result.method} "
    ratio = result.explained_variance_ratio if result.method == "pca" else None
    figures.embedding_scatter(result.coords, groups.labels, folder / "embedding.png", prefix,
                              ratio, title=f"{result.method.upper()} of the common-line matrix, "
                                           f"{groups.method} clusters")
    figures.explained_variance_figure(result.explained_variance_ratio,
                                      folder / "explained_variance.png", result.method)
    titles = [f"r{r} c{c}" for r, c in zip(averages.replicate, averages.klass, strict=True)]
    figures.cluster_montage(averages.intens, result.coords, groups.labels,
                            folder / "cluster_montage.png", titles=titles)
    if model is not None:
        figures.regressor_figure(result.coords, model.training_prediction,
                                 model.validation_index, folder / "regressor.png", model.metrics)
    if truth_avg is not None:
        figures.truth_scatter(result.coords, truth_avg["majority"], truth_avg["mean_t"],
                              truth_avg["names"], folder / "embedding_truth.png", prefix, ratio,
                              title="averages coloured by their frames' truth")
