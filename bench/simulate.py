"""Benchmark of `spiscape simulate`: frames per second and peak memory on the default dataset.

    python bench/simulate.py                      # the default dataset (4000 frames)
    python bench/simulate.py --num-frames 20000   # more frames: per-frame cost dominates
    python bench/simulate.py --tracemalloc        # also the peak of Python allocations (slower)

Writes JSON to bench/results/simulate.json (or --out) and prints a small table. The dataset goes
to a temporary folder unless --data-dir is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from spiscape import __version__
from spiscape.simulate import SimulationParams, simulate_dataset

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def run(num_frames: int | None, data_dir: Path, use_tracemalloc: bool, seed: int) -> dict:
    options = {"seed": seed}
    if num_frames is not None:
        options["num_frames"] = num_frames
    params = SimulationParams.from_dict(options)
    rss_before = peak_rss_mb()
    if use_tracemalloc:
        tracemalloc.start()
    start = time.perf_counter()
    summary = simulate_dataset(params, data_dir)
    wall = time.perf_counter() - start
    traced = None
    if use_tracemalloc:
        traced = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    sizes = {name: (data_dir / name).stat().st_size / 2**20
             for name in ("photons.h5", "detector.h5", "truth.h5")}
    steps = summary["seconds_by_step"]
    return {
        "benchmark": "simulate",
        "spiscape_version": __version__,
        "num_frames": params.num_frames,
        "wall_seconds": wall,
        "frames_per_second": params.num_frames / wall,
        "frames_per_second_frame_loop": params.num_frames / steps["frames"],
        "seconds_by_step": steps,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_before_run": rss_before,
        "peak_traced_python_mb": traced,
        "photons_per_frame_mean": summary["photons_per_frame_mean"],
        "photons_per_frame_std": summary["photons_per_frame_std"],
        "mean_photons_requested": params.mean_photons,
        "detector_pixels": summary["num_pix"],
        "detector_side": summary["detector_side"],
        "pixels_by_mask": summary["pixels_by_mask"],
        "grid_size": params.grid_size,
        "num_volumes": summary["num_volumes"],
        "output_mb": sizes,
        "populations": summary["populations"],
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
    }


def print_table(result: dict) -> None:
    steps = result["seconds_by_step"]
    rows = [
        ("frames", f"{result['num_frames']}"),
        ("wall time", f"{result['wall_seconds']:.2f} s"),
        ("  setup (shapes, intensities)", f"{steps['setup']:.2f} s"),
        ("  frames (slice, Poisson, write)", f"{steps['frames']:.2f} s"),
        ("  truth.h5 + detector.h5", f"{steps['truth']:.2f} s"),
        ("frames / s (overall)", f"{result['frames_per_second']:.0f}"),
        ("frames / s (frame loop)", f"{result['frames_per_second_frame_loop']:.0f}"),
        ("peak RSS", f"{result['peak_rss_mb']:.0f} MiB"),
        ("photons / frame", f"{result['photons_per_frame_mean']:.0f} "
                            f"(requested {result['mean_photons_requested']:.0f})"),
        ("detector pixels", f"{result['detector_pixels']} "
                            f"({result['detector_side']} x {result['detector_side']})"),
        ("output", ", ".join(f"{k} {v:.1f} MiB" for k, v in result["output_mb"].items())),
    ]
    if result["peak_traced_python_mb"] is not None:
        rows.insert(8, ("peak traced allocations", f"{result['peak_traced_python_mb']:.0f} MiB"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-frames", type=int, default=None,
                        help="frames to simulate (default: the default dataset's)")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "simulate.json"),
                        help="where to write the JSON result")
    parser.add_argument("--data-dir", default=None,
                        help="keep the simulated dataset here (default: a temporary folder)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="also record the peak of Python allocations (slows the run)")
    args = parser.parse_args(argv)

    if args.data_dir:
        result = run(args.num_frames, Path(args.data_dir), args.tracemalloc, args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="spiscape-bench-") as tmp:
            result = run(args.num_frames, Path(tmp), args.tracemalloc, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
