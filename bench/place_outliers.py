"""The outlier flag of ``spiscape place`` on species the reference never saw.

    .venv/bin/python bench/place_outliers.py                      # df80contam and the demo
    .venv/bin/python bench/place_outliers.py --datasets df80contam

Per dataset: the frames of the contaminant species and 15 % of the cube / melting / sphere frames
(seeded) are held out; a landscape is built from the rest by the CLI stages (2 replicates of
``--num-classes`` classes, averages, common lines, embedding, landscape); the held-out frames are
then placed on it with the outlier threshold calibrated on 2000 of the reference's frames (as
``spiscape place`` does). Reports the AUC of ``misfit`` for contaminant against clean frames and
the share flagged per species. Writes ``bench/results/place_outliers.json`` and a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent))

from emc import dataset_files  # noqa: E402

from tests.test_place import build_reference  # noqa: E402 - the tests' landscape builder

CLEAN = ("cube", "melting", "sphere")


def measure(name: str, args, work: Path) -> dict:
    import shutil

    from spiscape.embed.place import Placer, Reference
    from spiscape.io import read_detector, read_photons, write_photons
    from spiscape.io.truth import read_truth

    photons, detector, truth = dataset_files(name)
    t = read_truth(truth, volumes=False)
    labels, names = np.asarray(t.label), t.label_names
    contaminant = ~np.isin(labels, [names.index(n) for n in CLEAN if n in names])
    held = ~contaminant & (np.random.default_rng(args.seed).random(labels.size) < 0.15)
    frames = read_photons([photons])
    folder = work / name
    for part, chosen in (("reference", ~contaminant & ~held), ("query", contaminant | held)):
        (folder / part).mkdir(parents=True, exist_ok=True)
        if not (folder / part / "photons.h5").exists():
            write_photons(frames.select(np.flatnonzero(chosen)), folder / part / "photons.h5")
        shutil.copy(detector, folder / part / "detector.h5")
    query_labels = labels[contaminant | held]
    build_reference(folder / "reference" / "photons.h5", folder / "reference" / "detector.h5",
                    folder / "landscape", args.num_classes)
    placer = Placer(Reference.from_results(folder / "landscape"), read_detector(detector))
    sample = read_photons([folder / "reference" / "photons.h5"]).to_dense()
    take = np.unique(np.linspace(0, len(sample) - 1, min(len(sample), 2000)).astype(int))
    threshold = placer.calibrate(sample[take], args.quantile)
    placed = placer.place(read_photons([folder / "query" / "photons.h5"]).to_dense())
    dirty = ~np.isin(query_labels, [names.index(n) for n in CLEAN if n in names])
    flagged = {names[k]: round(float(placed["outlier"][query_labels == k].mean()), 3)
               for k in np.unique(query_labels)}
    return {"dataset": name, "reference_frames": int((~contaminant & ~held).sum()),
            "threshold": threshold, "quantile": args.quantile,
            "auc": float(roc_auc_score(dirty, placed["misfit"])),
            "flagged_clean": float(placed["outlier"][~dirty].mean()),
            "flagged_contaminant": float(placed["outlier"][dirty].mean()),
            "flagged_by_species": flagged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["df80contam", "demo"])
    parser.add_argument("--num-classes", type=int, default=20)
    parser.add_argument("--quantile", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(HERE / "results" / "place_outliers_runs"))
    parser.add_argument("--json", default=str(HERE / "results" / "place_outliers.json"))
    args = parser.parse_args()
    rows = [measure(name, args, Path(args.work)) for name in args.datasets]
    Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    print("| set | reference frames | AUC | flagged clean | flagged contaminants | by species |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        species = ", ".join(f"{k} {v:.2f}" for k, v in r["flagged_by_species"].items())
        print(f"| {r['dataset']} | {r['reference_frames']} | {r['auc']:.3f} | "
              f"{r['flagged_clean']:.3f} | {r['flagged_contaminant']:.3f} | {species} |")


if __name__ == "__main__":
    main()
