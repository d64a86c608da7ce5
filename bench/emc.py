"""Benchmark of EMC 2D classification: speed, memory per MPI rank, quality against the truth.

    .venv/bin/python bench/emc.py                        # default dataset, our EMC only
    .venv/bin/python bench/emc.py --dragonfly            # and Dragonfly's 2D mode, same inputs
    .venv/bin/python bench/emc.py --ranks 1 2 --repeat 5 # peak memory per rank vs shard size

Simulates the default dataset under bench/results/data when no --photons is given. Writes JSON
(bench/results/emc.json) and prints a table. Dragonfly (GPL) is never a dependency: it is run
from its own environment (see bench/dragonfly_baseline.py) when --dragonfly is asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def default_dataset(folder: Path) -> tuple[Path, Path, Path]:
    from spiscape.simulate.run import SimulationParams, simulate_dataset

    if not (folder / "truth.h5").exists():
        print(f"simulating the default dataset into {folder} ...", flush=True)
        simulate_dataset(SimulationParams(num_frames=4000, seed=20221), folder)
    return folder / "photons.h5", folder / "detector.h5", folder / "truth.h5"


def emc_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads), "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def run_ours(photons, detector, out: Path, args, ranks: int = 1, threads: int = 2) -> dict:
    cmd = [sys.executable, "-m", "spiscape", "classify2d", "--photons", *map(str, photons),
           "--detector", str(detector), "--out", str(out), "--num-classes", str(args.num_classes),
           "--num-rot", str(args.num_rot), "--iterations", str(args.iterations),
           "--seed", str(args.seed), "--device", args.device]
    if args.size:
        cmd += ["--size", str(args.size)]
    if ranks > 1:
        mpiexec = Path(sys.executable).with_name("mpiexec")
        cmd = [str(mpiexec), "--oversubscribe", "-n", str(ranks), *cmd]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=emc_env(threads), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"classify2d failed:\n{proc.stderr[-3000:]}")
    with h5py.File(out, "r") as f:
        table = f["log"][:]
        result = {
            "ranks": ranks,
            "threads_per_rank": threads,
            "frames": int(f["frames"].size),
            "grid_size": int(f.attrs["size"]),
            "seconds_per_iteration": float(np.median(table["seconds"][1:] if table.size > 1
                                                     else table["seconds"])),
            "seconds_per_iteration_all": table["seconds"].tolist(),
            "wall_seconds": wall,
            "peak_memory_mb_per_rank": f.attrs["peak_memory_mb_per_rank"].tolist(),
            "frames_per_rank": f.attrs["frames_per_rank"].tolist(),
            "final_log_likelihood": float(table["log_likelihood"][-1]),
        }
    return result


def quality(rep: Path, truth: Path, detector: Path) -> dict:
    from spiscape.io import read_detector
    from spiscape.metrics.classification import score_replicate

    return score_replicate(rep, truth, read_detector(detector))


def dragonfly_quality(output: Path, truth: Path) -> dict:
    """Purity of Dragonfly's classes (its final occupancies), scored like ours."""
    from spiscape.metrics.classification import purity_by_population

    with h5py.File(output, "r") as f:
        occupancies = f["occupancies"][:]
    with h5py.File(truth, "r") as t:
        labels = t["label"][:].astype(np.int64)
        names = json.loads(t.attrs["label_names"])
    classes = occupancies.argmax(axis=1)
    return {"purity": purity_by_population(classes, labels, occupancies.shape[1], names)}


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photons", nargs="+", default=None)
    parser.add_argument("--detector", default=None)
    parser.add_argument("--truth", default=None)
    parser.add_argument("--num-classes", type=int, default=50)
    parser.add_argument("--num-rot", type=int, default=36)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dragonfly", action="store_true", help="also run Dragonfly's 2D mode")
    parser.add_argument("--ranks", type=int, nargs="*", default=[],
                        help="also measure peak memory per rank with these rank counts")
    parser.add_argument("--repeat", type=int, default=5,
                        help="the photon file list repeated this many times for --ranks")
    parser.add_argument("--memory-iterations", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "emc.json"))
    args = parser.parse_args()

    if args.photons:
        photons, detector = [Path(p) for p in args.photons], Path(args.detector)
        truth = Path(args.truth) if args.truth else None
    else:
        p, detector, truth = default_dataset(HERE / "results" / "data")
        photons = [p]

    report: dict = {"params": {k: v for k, v in vars(args).items() if k != "out"}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours = run_ours(photons, detector, tmp / "ours.h5", args, threads=args.threads)
        report["spiscape"] = ours
        rows += [("frames", str(ours["frames"])),
                 ("classes x rotations", f"{args.num_classes} x {args.num_rot}"),
                 ("grid", f"{ours['grid_size']}^2"),
                 ("spiscape s/iteration", f"{ours['seconds_per_iteration']:.3f}"),
                 ("spiscape peak memory MB", f"{ours['peak_memory_mb_per_rank'][0]:.0f}")]
        if truth is not None:
            score = quality(tmp / "ours.h5", truth, detector)
            report["spiscape"]["quality"] = score
            rows += [(f"purity {k}", f"{v:.3f}") for k, v in score["purity"].items()]
            rows += [("pure classes", str(score["pure_classes"])),
                     ("class CC with truth (min/median)",
                      f"{score['class_cc_min']:.3f} / {score['class_cc_median']:.3f}"),
                     ("class log-CC with truth (min/median)",
                      f"{score['class_log_cc_min']:.3f} / {score['class_log_cc_median']:.3f}")]
        if args.dragonfly:
            import dragonfly_baseline as dfb

            # same data, classes, rotations (over pi, Friedel), grid, iterations and beta jumps;
            # Dragonfly keeps its own automatic start beta
            df = dfb.run_emc2d(
                photons[0], detector, tmp / "dragonfly", num_modes=args.num_classes,
                num_rot=args.num_rot, size=ours["grid_size"], iterations=args.iterations,
                threads=args.threads, seed=args.seed, friedel=True, beta_jump=2**0.5,
                beta_period=5,
            )
            if truth is not None:
                df["quality"] = dragonfly_quality(Path(df["output"]), truth)
                rows += [(f"Dragonfly purity {k}", f"{v:.3f}")
                         for k, v in df["quality"]["purity"].items()]
            secs = df["seconds_per_iteration"]
            df_per_iter = float(np.median(secs[1:] if len(secs) > 1 else secs))
            report["dragonfly"] = {k: v for k, v in df.items() if k != "intens"}
            report["dragonfly"]["seconds_per_iteration_median"] = df_per_iter
            report["speedup_vs_dragonfly"] = df_per_iter / ours["seconds_per_iteration"]
            rows += [("Dragonfly s/iteration", f"{df_per_iter:.3f}"),
                     ("speed-up over Dragonfly", f"{report['speedup_vs_dragonfly']:.2f}x")]
            if "quality" in df:
                report["dragonfly"]["quality"] = df["quality"]
        if args.ranks:
            repeated = photons * args.repeat
            memory = []
            mem_args = argparse.Namespace(**{**vars(args), "iterations": args.memory_iterations})
            for ranks in args.ranks:
                res = run_ours(repeated, detector, tmp / f"mem{ranks}.h5", mem_args, ranks=ranks,
                               threads=max(1, args.threads // ranks))
                memory.append(res)
                rows.append((f"{ranks} rank(s), {res['frames']} frames: peak MB per rank",
                             ", ".join(f"{m:.0f}" for m in res["peak_memory_mb_per_rank"])))
            report["memory_per_rank"] = memory
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float))
    print(table(rows))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
