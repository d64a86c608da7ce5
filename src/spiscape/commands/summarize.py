"""One index table across datasets: frames, classes, clusters, key metrics, result paths.

The entry point of a facility-wide reprocessing: one row per dataset (run), read from the
outputs of its stages, written as a tab-separated table (and JSON) that a spreadsheet or pandas
reads directly. Stages a dataset has not reached are left empty.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from spiscape.errors import InputError
from spiscape.io.averages import read_averages
from spiscape.io.embedding import read_embedding
from spiscape.utils.atomic import atomic_path

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out": "file", "health": "file"}

#: shown under "Example" in ``spiscape summarize -h``
EXAMPLE = """\
spiscape summarize --results results/ --datasets run1 run2 --out results/summary.tsv
"""

COLUMNS = (
    "dataset", "frames", "photons_per_frame", "empty_frames", "averages", "replicates",
    "clusters", "explained_variance_pc1", "frames_placed", "ari_populations",
    "spearman_t", "landscape", "cluster_fractions", "outliers", "health", "results",
)


def add_args(parser):
    parser.add_argument("--results", required=True, help="the results folder (results/)")
    parser.add_argument("--datasets", nargs="+", required=True, help="dataset names")
    parser.add_argument("--out", required=True, help="output table (.tsv); JSON beside it")
    parser.add_argument("--health", default=None,
                        help="health table (.tsv, JSON beside it): per dataset the checks of "
                             "spiscape.qc.health, with warnings in the log")


def _json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None


def dataset_row(results: Path, name: str) -> dict:
    """The index row of one dataset from whatever stages it has finished."""
    folder = results / name
    row = {"dataset": name, "results": str(folder)}
    summary = _json(folder / "inspect" / "summary.json")
    row["frames"] = summary.get("num_frames")
    mean = summary.get("photons_per_frame_mean")
    row["photons_per_frame"] = None if mean is None else round(mean, 1)
    row["empty_frames"] = summary.get("empty_frames")
    averages = folder / "averages.h5"
    if averages.exists():
        stored = read_averages(averages, with_intens=False)
        row["averages"] = stored.count
        row["replicates"] = len(set(stored.replicate.tolist()))
    embedding = folder / "embedding.h5"
    if embedding.exists():
        emb = read_embedding(embedding)
        row["clusters"] = int(emb.attrs["num_clusters"])
        ratio = emb.explained_variance_ratio
        row["explained_variance_pc1"] = (round(float(ratio[0]), 3) if ratio is not None
                                         and len(ratio) else None)
    row["landscape"], row["outliers"], labels = "own", None, None
    if (folder / "placed.h5").exists():
        from spiscape.io.placed import read_placed

        placed = read_placed(folder / "placed.h5")
        row["landscape"] = "placed on " + Path(str(placed["attrs"].get("reference", "?"))).name
        labels = placed["label"]
        if np.isfinite(float(placed["attrs"].get("outlier_threshold", np.nan))):
            row["outliers"] = round(float(np.mean(placed["outlier"])), 4)
    elif (folder / "frames.h5").exists():
        from spiscape.io.frames import read_landscape

        labels = read_landscape(folder / "frames.h5")["label"]
    if labels is not None and len(labels):
        values, counts = np.unique(labels, return_counts=True)
        # the runs of a beamtime compared on one map: each cluster's share of the frames
        row["cluster_fractions"] = " ".join(f"{int(v)}:{c / len(labels):.3f}"
                                            for v, c in zip(values, counts, strict=True))
    metrics = _json(folder / "landscape_metrics.json")
    row["frames_placed"] = metrics.get("frames_placed")
    ari = metrics.get("population_ari", {}).get("ari")
    row["ari_populations"] = None if ari is None else round(ari, 3)
    rho = metrics.get("melting_spearman", {}).get("best_abs_rho")
    row["spearman_t"] = None if rho is None else round(rho, 3)
    return row


def main(args):
    from spiscape.qc import health

    results = Path(args.results)
    rows = [dataset_row(results, name) for name in args.datasets]
    checks = {name: health.dataset_health(results / name) for name in args.datasets}
    for row in rows:
        health.log_health(row["dataset"], checks[row["dataset"]])
        warned = health.warnings(checks[row["dataset"]])
        row["health"] = "ok" if not warned else "warn: " + ", ".join(warned)
    if args.health:
        health.write_health(checks, Path(args.health))
    out = Path(args.out)
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(rows, indent=2))
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, delimiter="\t")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in COLUMNS})
    log.info("%d datasets -> %s", len(rows), out)
