"""The per-frame latents of finished runs again, with the volumes at the latent points refined
from the frames by 0, 1, ... EM iterations (``spiscape vae --frame-refine``), on the same
decoders, latent grids and frames as the runs' ``vae`` rule: what the refinement changes,
without retraining anything.

    .venv/bin/python bench/frame_refine.py --results bench/results/sweep/global --refine 0 1
    .venv/bin/python bench/frame_refine.py --only df128low --refine 2

For every set: the run's model (``vae/model.pt``), the latent grid the rule builds from the
trained averages' latents (``vae/latent.h5``) with the run's number of points, size range and
size steps (``vae/frame_latent.h5``), the frames it scores (a candidate trained class in some
replicate), its ``q_min`` and ``q_step`` (``vae/training.json``); each frame's orientation over
the 8 degree grid of all orientations (the default). Scored against the truth: per-frame
|Spearman| of the latent with t (``rho``, as ``rho_latent`` of bench/validation.py) and |Somers'
D| (``somers``); the frames' mean log evidence before each iteration and after the last (no
truth). Writes a JSON (one row per set and refine) and prints a table. """

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

import foreign_data  # noqa: E402

#: the validation matrix: the demo and bench/foreign_data.py's sets (as bench/validation.py)
MATRIX = ("demo", *foreign_data.DATASETS)


def run_set(name: str, data: Path, results: Path, refines: list[int],
            frames: int | None = None) -> list[dict]:
    from validation import somers_latent, truth_path

    from spiscape.io import read_detector
    from spiscape.io.averages import read_averages
    from spiscape.io.truth import read_truth
    from spiscape.io.volumes import read_latent
    from spiscape.metrics.landscape import melting_spearman
    from spiscape.vae import frame_posterior as fp
    from spiscape.vae.train import load_model

    res = results / name
    folder = res / "data" if name == "demo" else data / name
    truth = read_truth(truth_path(name, data, results), volumes=False)
    cfg = json.loads((res / "vae/training.json").read_text())["config"]
    model = load_model(res / "vae/model.pt")
    latent = read_latent(res / "vae/latent.h5")
    mu, selected = latent["mu"], latent["selected"]
    with h5py.File(res / "vae/frame_latent.h5", "r") as f:  # the rule's own grid and sizes
        points = int(f.attrs.get("points", 21))
        size_range = float(f.attrs.get("size_range", 0.08))
        steps = int(f.attrs.get("size_steps", 5))
    averages = read_averages(res / "averages.h5", with_intens=False)
    classes = fp.Classes(replicate=averages.replicate[selected], klass=averages.klass[selected],
                         quaternion=np.zeros((int(selected.sum()), 4)),
                         log_scale=np.zeros(int(selected.sum())))
    replicates = sorted((res / "classify2d").glob("rep*.h5"))
    scored = fp.scored_frames(replicates, classes, truth.num_frames)
    if frames is not None:  # the first ``frames`` scored frames (a quick timing)
        scored &= np.cumsum(scored) <= frames
    z = fp.latent_grid(mu[selected], points)
    det = read_detector(folder / "detector.h5")
    rows = []
    for refine in refines:
        start = time.perf_counter()
        post = fp.global_latents(model, det, [folder / "photons.h5"], z, scored,
                                 q_min=cfg["q_min"], q_step=cfg["q_step"],
                                 sizes=fp.size_steps(size_range, steps), refine=refine)
        rows.append({"dataset": name, "refine": refine,
                     "rho": melting_spearman(post["latent"][:, :1], truth.label,
                                             truth.t)["best_abs_rho"],
                     "somers": somers_latent(post["latent"], truth),
                     "evidence_steps": post["evidence_steps"], "evidence": post["evidence"],
                     "frames": int(scored.sum()), "seconds": time.perf_counter() - start})
        print(f"{name} refine {refine}: rho {rows[-1]['rho']:.4f} "
              f"({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "bench/data/validation",
                        help="the matrix's data (bench/foreign_data.py)")
    parser.add_argument("--results", type=Path, default=REPO / "bench/results/validation",
                        help="finished runs of bench/validation.py")
    parser.add_argument("--only", nargs="+", default=None, choices=MATRIX)
    parser.add_argument("--refine", nargs="+", type=int, default=[0, 1],
                        help="EM iterations of the volumes to compare")
    parser.add_argument("--frames", type=int, default=None,
                        help="score only the first N scored frames of each set (a timing)")
    parser.add_argument("--json", type=Path, default=REPO / "bench/results/frame_refine.json")
    args = parser.parse_args(argv)
    if any(r < 0 for r in args.refine):
        parser.error("--refine: iterations are >= 0")
    if args.frames is not None and args.frames < 1:
        parser.error("--frames: at least 1")
    rows = []
    for name in args.only or MATRIX:
        if not (args.results / name / "vae/model.pt").exists():
            print(f"{name}: no finished run in {args.results}, skipped", flush=True)
            continue
        rows += run_set(name, args.data, args.results, args.refine, args.frames)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows}, indent=1))
    print("\n| set | refine | frames | rho | somers | mean log evidence | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['dataset']}` | {r['refine']} | {r['frames']} | {r['rho']:.4f} | "
              f"{r['somers']:.3f} | {r['evidence']:.2f} | {r['seconds']:.0f} |")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
