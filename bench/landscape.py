"""Benchmark of the landscape: embed + per-frame landscape on a simulated dataset, scored.

    .venv/bin/python bench/landscape.py                      # results/demo, defaults
    .venv/bin/python bench/landscape.py --sweep              # and the variants in the table
    .venv/bin/python bench/landscape.py --dataset results/default

Reads ``{dataset}/averages.h5``, ``{dataset}/classify2d/rep*.h5`` and ``{dataset}/data/truth.h5``
and uses ``{dataset}/commonlines.h5`` when it exists (else computes it with `spiscape
commonlines`, defaults, under the work folder). Runs `spiscape embed` and `spiscape landscape`
as a user would, and reports the targets of the landscape issue: the adjusted Rand index of the
frames' clusters against cube / sphere / contaminant (melting frames left out) >= 0.8, and the
best Spearman |rho| of an embedding component with the melting parameter t among non-contaminant
frames >= 0.8. With --sweep, the CC transform, embedding and clustering variants are scored as
well (in-process, no regressor), to show what the result depends on. Writes JSON
(bench/results/landscape.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGETS = {"population_ari": 0.8, "melting_spearman": 0.8}


def spiscape(*args) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "spiscape", *map(str, args)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"spiscape {args[0]} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def sweep(commonlines: Path, averages: Path, replicates, truth_path: Path) -> list[dict]:
    from spiscape.embed import clustering, embedding
    from spiscape.embed.landscape import frame_coordinates
    from spiscape.io.averages import read_averages
    from spiscape.io.commonlines import read_commonlines
    from spiscape.io.replicate import read_replicates
    from spiscape.io.truth import read_truth
    from spiscape.metrics.landscape import score_landscape

    cc = read_commonlines(commonlines)
    avg = read_averages(averages, with_intens=False)
    reps = read_replicates(replicates)
    truth = read_truth(truth_path, volumes=False)
    rows = []
    for transform in ("fisher", "none"):
        for method in ("pca", "isomap", "spectral"):
            for components in (2, 3):
                coords = embedding.embed(cc, method, components, 1,
                                         cc_transform=transform).coords
                for cluster, count in (("kmeans", "auto"), ("kmeans", 3), ("kmeans", 4),
                                       ("gmm", "auto"), ("hdbscan", "auto")):
                    groups = clustering.cluster(coords, cluster, count, 1)
                    placed = frame_coordinates(truth.num_frames, reps, avg.replicate,
                                               avg.klass, coords, groups.labels)
                    score = score_landscape(placed["coords"], placed["label"], truth.label,
                                            truth.t)
                    rows.append({"cc_transform": transform, "method": method,
                                 "components": components, "cluster": cluster,
                                 "num_clusters": count, "found": groups.num_clusters,
                                 "ari": score["population_ari"]["ari"],
                                 "rho": score["melting_spearman"]["best_abs_rho"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(REPO / "results" / "demo"),
                        help="results/{ds} folder of a simulated dataset")
    parser.add_argument("--work", default=str(HERE / "results" / "landscape"),
                        help="folder for the outputs (embedding, frames.h5, figures)")
    parser.add_argument("--out", default=str(HERE / "results" / "landscape.json"))
    parser.add_argument("--sweep", action="store_true", help="also score the variants")
    parser.add_argument("embed_args", nargs="*",
                        help="extra arguments for `spiscape embed` (after --)")
    args = parser.parse_args()
    dataset, work = Path(args.dataset), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    averages = dataset / "averages.h5"
    replicates = sorted((dataset / "classify2d").glob("rep[0-9]*.h5"))
    replicates = [p for p in replicates if ".ckpt" not in p.name]
    truth = dataset / "data" / "truth.h5"
    commonlines = dataset / "commonlines.h5"
    timings = {}
    if not commonlines.exists():
        commonlines = work / "commonlines.h5"
        timings["commonlines_s"] = spiscape("commonlines", "--averages", averages, "--out",
                                            commonlines, "--device", "cpu")
    figures = work / "figures"
    timings["embed_s"] = spiscape(
        "embed", "--commonlines", commonlines, "--averages", averages,
        "--out", work / "embedding.h5", "--model", work / "embedding_model.pt",
        "--figure-dir", figures, "--replicates", *replicates, "--truth", truth,
        *args.embed_args)
    timings["landscape_s"] = spiscape(
        "landscape", "--embedding", work / "embedding.h5", "--averages", averages,
        "--replicates", *replicates, "--truth", truth, "--out", work / "frames.h5",
        "--metrics-json", work / "metrics.json", "--figure-dir", figures)
    import h5py

    with h5py.File(work / "embedding.h5", "r") as f:
        embed_metrics = json.loads(f.attrs["metrics"])
        averages_count = int(f["coords"].shape[0])
    scores = json.loads((work / "metrics.json").read_text())
    ari = scores["population_ari"]["ari"]
    rho = scores["melting_spearman"]["best_abs_rho"]
    report = {
        "dataset": str(dataset), "commonlines": str(commonlines),
        "replicates": [str(p) for p in replicates], "averages": averages_count,
        "embed_args": args.embed_args, "timings": timings,
        "population_ari": ari, "contingency": scores["population_ari"]["contingency"],
        "melting_spearman": rho, "spearman_per_component": scores["melting_spearman"]["rho"],
        "frames_placed": scores["frames_placed"], "frames_total": scores["frames_total"],
        "targets": TARGETS,
        "passed": {"population_ari": ari >= TARGETS["population_ari"],
                   "melting_spearman": rho >= TARGETS["melting_spearman"]},
        "embedding": embed_metrics,
        "figures": sorted(str(p) for p in figures.glob("*.png")),
    }
    print(f"{averages_count} averages from {len(replicates)} replicates; "
          f"{scores['frames_placed']}/{scores['frames_total']} frames placed")
    print(f"population ARI        {ari:.3f}  (target >= {TARGETS['population_ari']})")
    print(f"best Spearman |rho|   {rho:.3f}  (target >= {TARGETS['melting_spearman']})")
    print(f"clusters              {embed_metrics['clusters']['sizes']} averages")
    print(f"contingency           {scores['population_ari']['contingency']}")
    stability = embed_metrics.get("stability", {})
    print(f"bootstrap disparity   {stability.get('mean_disparity')}")
    regressor = embed_metrics.get("regressor", {})
    if regressor:
        print(f"regressor val. MSE    {[round(x, 3) for x in regressor['validation_mse']]} "
              f"(R^2 {[round(x, 2) for x in regressor['validation_r2']]})")
    if args.sweep:
        report["sweep"] = sweep(commonlines, averages, replicates, truth)
        print(f"\n{'transform':9} {'method':8} {'k':>2} {'cluster':8} {'asked':>5} "
              f"{'found':>5} {'ARI':>6} {'rho':>6}")
        for row in report["sweep"]:
            print(f"{row['cc_transform']:9} {row['method']:8} {row['components']:>2} "
                  f"{row['cluster']:8} {row['num_clusters']!s:>5} {row['found']:>5} "
                  f"{row['ari']:6.3f} {row['rho']:6.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
