#!/usr/bin/env python
"""Placement speed and agreement (``spiscape place``): frames placed per second on a landscape,
and how the placed clusters and coordinates agree with the batch landscape of the same frames.

    .venv/bin/python bench/place.py                      # the demo's results (make run first)
    .venv/bin/python bench/place.py --reference results/df128low --photons ... --detector ...

Writes JSON (bench/results/place.json) and prints a table. Threads: OMP_NUM_THREADS (2 here).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main() -> None:
    from scipy.stats import spearmanr

    from spiscape.embed.place import Placer, Reference
    from spiscape.io import iter_chunks, read_detector
    from spiscape.io.frames import read_landscape

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default=str(REPO / "results/demo"))
    parser.add_argument("--photons", nargs="+", default=None,
                        help="default: the reference's own data/photons.h5")
    parser.add_argument("--detector", default=None)
    parser.add_argument("--block-frames", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="passes over the frames (best)")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="cpu")
    parser.add_argument("--out", default=str(HERE / "results" / "place.json"))
    args = parser.parse_args()
    ref_dir = Path(args.reference)
    photons = args.photons or [str(ref_dir / "data/photons.h5")]
    detector = read_detector(args.detector or ref_dir / "data/detector.h5")

    t0 = time.perf_counter()
    reference = Reference.from_results(ref_dir)
    from spiscape.backend import get_array_module

    placer = Placer(reference, detector, xp=get_array_module(args.device))
    setup = time.perf_counter() - t0
    blocks = [chunk.to_dense() for _, chunk in
              iter_chunks(photons, args.block_frames, num_pix=detector.num_pix)]
    frames = sum(len(b) for b in blocks)
    best, results = np.inf, None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        results = [placer.place(b) for b in blocks]
        best = min(best, time.perf_counter() - t0)
    placed = {k: np.concatenate([r[k] for r in results]) for k in results[0]}
    row = {"reference": str(ref_dir), "device": args.device, "frames": frames,
           "averages": int(reference.intens.shape[0]),
           "rotations": reference.num_rot, "pixels_used": int(placer.used.size),
           "photons_per_frame": float(np.mean([b.sum(axis=1).mean() for b in blocks])),
           "setup_seconds": setup, "seconds": best, "frames_per_second": frames / best}
    frames_h5 = ref_dir / "frames.h5"
    if frames_h5.exists() and not args.photons:
        import h5py

        batch = read_landscape(frames_h5)
        with h5py.File(frames_h5, "r") as f:
            drawn = f["num_replicates"][()]
        both = batch["label"] >= 0
        every = both & (drawn == drawn.max())
        row["cluster_agreement"] = float(np.mean(placed["label"][both] == batch["label"][both]))
        row["spearman_every_replicate"] = [
            float(spearmanr(placed["coords"][every, k], batch["clpca"][every, k])[0])
            for k in range(batch["clpca"].shape[1])]
        row["spearman_all_placed"] = [
            float(spearmanr(placed["coords"][both, k], batch["clpca"][both, k])[0])
            for k in range(batch["clpca"].shape[1])]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1))
    print("| measure | value |\n|---|---|")
    for key, value in row.items():
        shown = (f"{value:.4g}" if isinstance(value, float) else
                 ", ".join(f"{v:.3f}" for v in value) if isinstance(value, list) else value)
        print(f"| {key} | {shown} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
