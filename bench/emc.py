"""Benchmark of EMC 2D classification: speed, memory per MPI rank, quality, and Dragonfly.

    .venv/bin/python bench/emc.py --dragonfly       # demo, df80contam, df128low and Dragonfly
    .venv/bin/python bench/emc.py --datasets df128b2 --num-classes 20 --iterations 20 --dragonfly
    .venv/bin/python bench/emc.py --photons P.h5 --detector D.h5 [--truth T.h5] --dragonfly
    .venv/bin/python bench/emc.py --scaling                # frames, classes x rotations, pixels
    .venv/bin/python bench/emc.py --ranks 1 2 --repeat 5   # peak memory per rank vs shard size

Datasets: ``demo`` (simulated under bench/results/data on first use) and the validation matrix's
sets under bench/data/validation (``bench/foreign_data.py`` makes them). The default trio is the
issue's: the demo geometry, a detector of >= 5000 pixels at >= 1500 photons a frame (df80contam:
80^2, ~2000) and 128^2 at ~300 photons (df128low). Each runs our EMC and, with --dragonfly,
Dragonfly's 2D mode on the same files with the same classes, rotations (over pi, Friedel), grid,
iterations, beta jumps and 2 threads each, in one run; the ratio is of the medians of iterations
2..N. ``late/early`` is the median of the last 5 iterations over that of iterations 2-6 (the
cost across the annealing). Purity is per population and over all frames (each frame counted
under its class's majority label).

--scaling times 2-3 iterations on synthetic frames (Poisson photons from random anisotropic
sphere-like patterns, made here in seconds) over frames (10^3..10^5), classes x rotations
(10 x 24 .. 200 x 90) and detectors (61^2, 96^2, 128^2 at 300 and 2000 photons), with s/iteration
and peak RSS per rank. Writes JSON (bench/results/emc.json) and prints tables. Dragonfly (GPL) is
never a dependency: it runs from its own environment (see bench/dragonfly_baseline.py).
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
VALIDATION = HERE / "data" / "validation"
DEFAULT_DATASETS = ["demo", "df80contam", "df128low"]


def default_dataset(folder: Path) -> tuple[Path, Path, Path]:
    from spiscape.simulate.run import SimulationParams, simulate_dataset

    if not (folder / "truth.h5").exists():
        print(f"simulating the default dataset into {folder} ...", flush=True)
        simulate_dataset(SimulationParams(num_frames=4000, seed=20221), folder)
    return folder / "photons.h5", folder / "detector.h5", folder / "truth.h5"


def dataset_files(name: str) -> tuple[Path, Path, Path | None]:
    if name == "demo":
        return default_dataset(HERE / "results" / "data")
    folder = VALIDATION / name
    if not (folder / "photons.h5").exists():
        raise SystemExit(f"{folder} has no photons.h5: run bench/foreign_data.py --only {name}")
    truth = folder / "truth.h5"
    return folder / "photons.h5", folder / "detector.h5", truth if truth.exists() else None


def emc_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads), "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def per_iteration(seconds) -> dict:
    """Median of iterations 2..N (the first pays for start-up in Dragonfly) and late / early."""
    secs = np.asarray(seconds, dtype=float)
    body = secs[1:] if secs.size > 1 else secs
    early = float(np.median(secs[1:6])) if secs.size > 2 else float(body[0])
    late = float(np.median(secs[-5:]))
    return {"seconds_per_iteration": float(np.median(body)), "early": early, "late": late,
            "late_over_early": late / max(early, 1e-12)}


def run_ours(photons, detector, out: Path, args, ranks: int = 1, threads: int = 2,
             extra: tuple = ()) -> dict:
    cmd = [sys.executable, "-m", "spiscape", "classify2d", "--photons", *map(str, photons),
           "--detector", str(detector), "--out", str(out), "--num-classes", str(args.num_classes),
           "--num-rot", str(args.num_rot), "--iterations", str(args.iterations),
           "--seed", str(args.seed), "--device", args.device, *extra]
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
            **per_iteration(table["seconds"]),
            "seconds_per_iteration_all": table["seconds"].tolist(),
            "wall_seconds": wall,
            "peak_memory_mb_per_rank": f.attrs["peak_memory_mb_per_rank"].tolist(),
            "frames_per_rank": f.attrs["frames_per_rank"].tolist(),
            "dense_pixels": int(f.attrs.get("dense_pixels", -1)),
            "sparse_below": float(f.attrs.get("sparse_below", np.nan)),
            "final_log_likelihood": float(table["log_likelihood"][-1]),
        }
    return result


def purity(classes: np.ndarray, labels: np.ndarray, num_classes: int, names) -> dict:
    """Per population and over all frames: the share of frames whose class's majority label is
    their own."""
    from spiscape.metrics.classification import majority_labels, purity_by_population

    out = purity_by_population(classes, labels, num_classes, names)
    out["all frames"] = float(np.mean(majority_labels(classes, labels, num_classes)[classes]
                                      == labels))
    return out


def truth_labels(truth: Path, frames=None):
    with h5py.File(truth, "r") as t:
        labels = t["label"][:].astype(np.int64)
        names = json.loads(t.attrs["label_names"])
    return (labels if frames is None else labels[frames]), names


def our_quality(rep: Path, truth: Path) -> dict:
    with h5py.File(rep, "r") as f:
        classes = f["occupancies"][:].argmax(axis=1)
        frames = f["frames"][:]
    labels, names = truth_labels(truth, frames)
    return purity(classes, labels, int(classes.max()) + 1, names)


def dragonfly_quality(output: Path, truth: Path) -> dict:
    """Purity of Dragonfly's classes (its final occupancies), scored like ours."""
    with h5py.File(output, "r") as f:
        occupancies = f["occupancies"][:]
    labels, names = truth_labels(truth)
    return purity(occupancies.argmax(axis=1), labels, occupancies.shape[1], names)


def compare(name: str, args, tmp: Path) -> dict:
    """Our EMC and (with --dragonfly) Dragonfly's on one dataset, same settings."""
    if args.photons:
        photons, detector = [Path(p) for p in args.photons], Path(args.detector)
        truth = Path(args.truth) if args.truth else None
    else:
        p, detector, truth = dataset_files(name)
        photons = [p]
    print(f"{name}: spiscape ...", flush=True)
    ours = run_ours(photons, detector, tmp / f"{name}.h5", args, threads=args.threads)
    from spiscape.io import read_detector

    det = read_detector(detector)
    from spiscape.io import read_photons

    photons_per_frame = float(read_photons(photons).photons_per_frame().mean())
    result = {"dataset": name, "pixels_used": int((det.mask == 0).sum()),
              "pixels": int(det.mask.size), "photons_per_frame": photons_per_frame,
              "spiscape": ours}
    if truth is not None:
        ours["purity"] = our_quality(tmp / f"{name}.h5", truth)
    if args.dragonfly:
        import dragonfly_baseline as dfb

        print(f"{name}: Dragonfly ...", flush=True)
        # same data, classes, rotations (over pi, Friedel), grid, iterations and beta jumps;
        # Dragonfly keeps its own automatic start beta
        df = dfb.run_emc2d(
            photons[0], detector, tmp / f"dragonfly_{name}", num_modes=args.num_classes,
            num_rot=args.num_rot, size=ours["grid_size"], iterations=args.iterations,
            threads=args.threads, seed=args.seed, friedel=True, beta_jump=2**0.5,
            beta_period=5,
        )
        entry = {k: v for k, v in df.items() if k not in ("intens", "log")}
        entry.update(per_iteration(df["seconds_per_iteration"]))
        entry["seconds_per_iteration_all"] = df["seconds_per_iteration"]
        if truth is not None:
            entry["purity"] = dragonfly_quality(Path(df["output"]), truth)
        result["dragonfly"] = entry
        result["speedup_vs_dragonfly"] = entry["seconds_per_iteration"] / ours[
            "seconds_per_iteration"]
    return result


# -- scaling ---------------------------------------------------------------------------------


def synthetic_dataset(folder: Path, side: int, frames: int, photons: float, seed: int = 0):
    """Frames of a ``side``² detector (the simulator's geometry, corners merged only): Poisson
    photons from 40 anisotropic sphere-like patterns (radius 15-30 nm, axis ratio 1-1.3, random
    in-plane angle), mean ``photons`` a frame with a Gamma(4) fluence. Photons are drawn by
    position (inverse CDF), so 10^5 frames take seconds."""
    from spiscape.io import PhotonWriter, SparsePhotons, write_detector
    from spiscape.simulate.detector import make_detector
    from spiscape.simulate.intensity import sphere_form_factor

    folder.mkdir(parents=True, exist_ok=True)
    photons_path, det_path = folder / "photons.h5", folder / "detector.h5"
    if photons_path.exists():
        return photons_path, det_path
    # binning 1, a max angle that makes the wanted side; q in 1/nm from the simulator's scale
    distance_mm, pixel_um = 705.0, 200.0 * 128 / side
    det = make_detector(distance_mm=distance_mm, pixel_um=pixel_um, binning=1,
                        beamstop_px=side / 25,
                        max_angle_deg=np.degrees(np.arctan((side // 2) * pixel_um * 1e-3
                                                           / distance_mm)) * 0.999)
    write_detector(det, det_path)
    rng = np.random.default_rng(seed)
    cx, cy = det.qx, det.qy
    to_nm = 0.3 / (side // 2)  # 0.3 1/nm at the edge whatever the side: finer pixels, same q
    patterns = []
    for _ in range(40):
        radius, ratio, angle = rng.uniform(15, 30), rng.uniform(1, 1.3), rng.uniform(0, np.pi)
        u = (cx * np.cos(angle) + cy * np.sin(angle)) * ratio
        v = -cx * np.sin(angle) + cy * np.cos(angle)
        q = np.hypot(u, v) * to_nm
        lam = sphere_form_factor(q, radius) ** 2 * det.corr
        lam[det.mask == 2] = 0
        patterns.append(lam / lam.sum())
    cdf = np.cumsum(np.array(patterns), axis=1)
    cdf /= cdf[:, -1:]
    with PhotonWriter(photons_path, det.qx.size) as out:
        for start in range(0, frames, 5000):
            n = min(5000, frames - start)
            which = rng.integers(0, len(patterns), n)
            counts = rng.poisson(photons * rng.gamma(4.0, 0.25, n))
            frame_of = np.repeat(np.arange(n), counts)
            u = rng.random(frame_of.size)
            pix = np.empty(frame_of.size, dtype=np.int64)
            for k in range(len(patterns)):
                sel = which[frame_of] == k
                pix[sel] = np.searchsorted(cdf[k], u[sel])
            key = np.unique(frame_of * det.qx.size + pix, return_counts=True)
            frame, pixel, count = key[0] // det.qx.size, key[0] % det.qx.size, key[1]
            ones, multi = count == 1, count > 1
            out.append(SparsePhotons(
                det.qx.size, np.bincount(frame[ones], minlength=n),
                np.bincount(frame[multi], minlength=n), pixel[ones], pixel[multi],
                count[multi]))
    return photons_path, det_path


SCALING = [
    # (frames, classes, rotations, side, photons, --memory-mb or None for the default)
    *[(n, 50, 36, 128, ph, None) for ph in (300, 2000) for n in (1000, 10000, 100000)],
    *[(10000, m, r, 128, 2000, None) for m, r in ((10, 24), (200, 90))],
    # 200 x 90 views of 128^2 pixels are 1.2 GB: above the default budget they are recomputed
    # per block; with 4 GB they are kept
    (10000, 200, 90, 128, 2000, 4096),
    *[(10000, 50, 36, side, ph, None) for ph in (300, 2000) for side in (61, 96)],
]


def scaling(args, tmp: Path) -> list[dict]:
    rows = []
    for number, (frames, m, r, side, ph, memory) in enumerate(SCALING):
        if args.scaling_max_frames and frames > args.scaling_max_frames:
            continue
        if args.scaling_rows and number not in args.scaling_rows:
            continue
        data = HERE / "results" / "data" / f"synthetic_{side}_{ph}_{frames}"
        t0 = time.perf_counter()
        photons, detector = synthetic_dataset(data, side, frames, ph)
        made = time.perf_counter() - t0
        run_args = argparse.Namespace(**{**vars(args), "num_classes": m, "num_rot": r,
                                         "iterations": args.scaling_iterations, "size": None})
        print(f"scaling: {frames} frames, {m} x {r}, {side}^2, {ph} photons ...", flush=True)
        extra = () if memory is None else ("--memory-mb", str(memory))
        res = run_ours([photons], detector, tmp / "scaling.h5", run_args, threads=args.threads,
                       extra=extra)
        rows.append({"frames": frames, "classes": m, "rotations": r, "side": side,
                     "photons": ph, "memory_mb": memory or "default",
                     "seconds_per_iteration": res["seconds_per_iteration"],
                     "peak_memory_mb": res["peak_memory_mb_per_rank"][0],
                     "dense_pixels": res["dense_pixels"], "wall_seconds": res["wall_seconds"],
                     "data_seconds": made})
    return rows


def executed_flops(photons: Path, dense_pixels: int, views: int, frames: int,
                   pixels_used: int) -> tuple[float, float]:
    """FLOPs of one iteration's two big products (E-step K @ log W, M-step K.T @ P), as the
    engine runs them (dense pixels as GEMM, the rest per photon) and as a dense engine would:
    2 x 2 x views x (frames x dense pixels + photons on sparse pixels), 2 x 2 x views x frames x
    pixels."""
    from spiscape.io import read_photons

    csr = read_photons(photons).to_csr()
    per_pixel = np.sort(np.bincount(csr.indices, minlength=csr.shape[1]))[::-1]
    sparse_terms = float(per_pixel[dense_pixels:].sum())
    executed = 4.0 * views * (frames * dense_pixels + sparse_terms)
    return executed, 4.0 * views * frames * pixels_used


def sgemm_peak(xp, n: int = 8192) -> float:
    """FLOP/s of a large float32 matrix product on this device (the achievable peak)."""
    a = xp.ones((n, n), dtype=xp.float32)
    a @ a
    if xp is not np:
        xp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        a @ a
    if xp is not np:
        xp.cuda.Device().synchronize()
    return 3 * 2.0 * n**3 / (time.perf_counter() - t0)


def gpu_figure(args, tmp: Path) -> dict:
    """s/iteration of 10^5 frames x 200 classes x 90 rotations at 128^2 (2000 photons) on one
    device, its executed FLOP rate against a measured SGEMM, and 2 ranks sharing the device."""
    from spiscape.backend import get_array_module

    xp = get_array_module(args.device)
    frames = args.gpu_frames
    folder = HERE / "results" / "data" / f"synthetic_128_2000_{frames}"
    photons, detector = synthetic_dataset(folder, 128, frames, 2000)
    run_args = argparse.Namespace(**{**vars(args), "num_classes": 200, "num_rot": 90,
                                     "iterations": 3, "size": None})
    res = run_ours([photons], detector, tmp / "gpu.h5", run_args, threads=args.threads)
    from spiscape.io import read_detector

    used = int((read_detector(detector).mask == 0).sum())
    executed, dense = executed_flops(photons, res["dense_pixels"], 200 * 90, frames, used)
    peak = sgemm_peak(xp)
    out = {"frames": frames, "classes": 200, "rotations": 90, "side": 129, "photons": 2000,
           "seconds_per_iteration": res["seconds_per_iteration"],
           "executed_tflops": executed / res["seconds_per_iteration"] / 1e12,
           "dense_equivalent_tflops": dense / res["seconds_per_iteration"] / 1e12,
           "sgemm_peak_tflops": peak / 1e12, "dense_pixels": res["dense_pixels"],
           "peak_memory_mb": res["peak_memory_mb_per_rank"]}
    out["fraction_of_sgemm_peak"] = out["executed_tflops"] / out["sgemm_peak_tflops"]
    two = run_ours([photons], detector, tmp / "gpu2.h5",
                   argparse.Namespace(**{**vars(run_args), "iterations": 2}), ranks=2,
                   threads=args.threads)
    out["two_ranks_seconds_per_iteration"] = two["seconds_per_iteration"]
    out["two_ranks_peak_memory_mb"] = two["peak_memory_mb_per_rank"]
    return out


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=None,
                        help=f"demo and/or validation sets (default with --dragonfly: "
                             f"{' '.join(DEFAULT_DATASETS)}; else demo)")
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
    parser.add_argument("--scaling", action="store_true", help="the scaling table only")
    parser.add_argument("--gpu-figure", action="store_true",
                        help="only: 10^5 frames x 200 x 90 at 128^2 on --device, with its share "
                             "of a measured SGEMM's FLOP rate, and 2 ranks on one device")
    parser.add_argument("--gpu-frames", type=int, default=100000)
    parser.add_argument("--scaling-iterations", type=int, default=3)
    parser.add_argument("--scaling-max-frames", type=int, default=None)
    parser.add_argument("--scaling-rows", type=int, nargs="*", default=None,
                        help="only these rows of SCALING (0-based)")
    parser.add_argument("--ranks", type=int, nargs="*", default=[],
                        help="also measure peak memory per rank with these rank counts")
    parser.add_argument("--repeat", type=int, default=5,
                        help="the photon file list repeated this many times for --ranks")
    parser.add_argument("--memory-iterations", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "emc.json"))
    args = parser.parse_args()

    report: dict = {"params": {k: v for k, v in vars(args).items() if k != "out"}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.gpu_figure:
            report["gpu_figure"] = gpu_figure(args, tmp)
            print(json.dumps(report["gpu_figure"], indent=1))
        elif args.scaling:
            report["scaling"] = scaling(args, tmp)
            print(f"\n{'frames':>7} {'M x R':>9} {'det':>5} {'phot':>5} {'budget':>7} "
                  f"{'s/iter':>8} {'peak MB':>8} {'dense px':>9}")
            for row in report["scaling"]:
                print(f"{row['frames']:>7} {row['classes']:>4} x {row['rotations']:<3} "
                      f"{row['side']:>4}² {row['photons']:>5} {row['memory_mb']:>7} "
                      f"{row['seconds_per_iteration']:>8.3f} {row['peak_memory_mb']:>8.0f} "
                      f"{row['dense_pixels']:>9}")
        else:
            names = (["custom"] if args.photons else
                     args.datasets or (DEFAULT_DATASETS if args.dragonfly else ["demo"]))
            report["datasets"] = [compare(name, args, tmp) for name in names]
            rows = []
            for res in report["datasets"]:
                ours = res["spiscape"]
                head = f"{res['dataset']} ({res['pixels_used']} px, " \
                       f"{res['photons_per_frame']:.0f} photons, {ours['frames']} frames)"
                rows += [(head, ""),
                         ("  classes x rotations, grid",
                          f"{args.num_classes} x {args.num_rot}, {ours['grid_size']}^2"),
                         ("  spiscape s/iteration (late/early)",
                          f"{ours['seconds_per_iteration']:.3f} ({ours['late_over_early']:.2f})"),
                         ("  spiscape dense pixels", f"{ours['dense_pixels']}"),
                         ("  spiscape peak MB", f"{ours['peak_memory_mb_per_rank'][0]:.0f}")]
                if "purity" in ours:
                    rows.append(("  spiscape purity", ", ".join(
                        f"{k} {v:.2f}" for k, v in ours["purity"].items())))
                if "dragonfly" in res:
                    df = res["dragonfly"]
                    rows += [("  Dragonfly s/iteration (late/early)",
                              f"{df['seconds_per_iteration']:.3f} "
                              f"({df['late_over_early']:.2f})"),
                             ("  speed-up over Dragonfly", f"{res['speedup_vs_dragonfly']:.2f}x")]
                    if "purity" in df:
                        rows.append(("  Dragonfly purity", ", ".join(
                            f"{k} {v:.2f}" for k, v in df["purity"].items())))
            if args.ranks:
                photons = ([Path(p) for p in args.photons] if args.photons
                           else [dataset_files(names[0])[0]])
                detector = Path(args.detector) if args.photons else dataset_files(names[0])[1]
                memory = []
                mem_args = argparse.Namespace(**{**vars(args),
                                                 "iterations": args.memory_iterations})
                for ranks in args.ranks:
                    res = run_ours(photons * args.repeat, detector, tmp / f"mem{ranks}.h5",
                                   mem_args, ranks=ranks, threads=max(1, args.threads // ranks))
                    memory.append(res)
                    rows.append((f"{ranks} rank(s), {res['frames']} frames: peak MB per rank",
                                 ", ".join(f"{m:.0f}" for m in res["peak_memory_mb_per_rank"])))
                report["memory_per_rank"] = memory
            print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=float))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
