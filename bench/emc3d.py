"""Multi-model 3D EMC against Dragonfly's 3D multi-mode EMC: same data, K, num_div, iterations,
start models and threads, one run.

    .venv/bin/python bench/emc3d.py                       # demo and df80contam, K 2, num_div 3
    .venv/bin/python bench/emc3d.py --datasets demo --num-models 3 --num-div 4 --iterations 12
    .venv/bin/python bench/emc3d.py --datasets demo --num-models 4 --num-div 4 --iterations 20 \
        --init-labels landscape --refine-cube          # seeded, the issue's K and num_div

Both start from the same models (spiscape's powder start, written to Dragonfly's start model
file) and anneal β by the same jump and period from the same start: ours' (by default one β for
every frame, 1/sqrt of the mean count) written to Dragonfly's config; ``--dragonfly-beta auto``
lets Dragonfly use its own automatic per-frame β instead. With
``--init-labels landscape`` (the workflow's seeding) ours first holds the frames to the
landscape's clusters for the label iterations; both programs then start from those models for
the remaining iterations (Dragonfly cannot hold frames to labels); with ``--no-dragonfly`` ours
runs as the workflow does, one run from the labels. Per
dataset: seconds per iteration (median of iterations 2..N), the ratio, and the quality of each
model assignment against the truth's populations (adjusted Rand index, and each model's purity:
the share of its frames from its most common population). Writes
``bench/results/emc3d.json`` and prints a table. Dragonfly runs from its own environment (see
bench/dragonfly_baseline.py); without it only ours runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from emc import dataset_files, emc_env, per_iteration  # noqa: E402


def aligned_shell_cc(model: np.ndarray, reference: np.ndarray, group: str,
                     q_range: tuple[float, float], fraction: float = 0.7) -> dict:
    """Shell correlation of a model with a truth intensity turned to it: the rotation maximising
    the correlation of their log intensities over the measured shells (``q_range``: the
    detector's smallest and largest |q| of a used pixel, voxels) to ``fraction`` of the largest,
    searched on the refined 600-cell (the asymmetric unit of the truth's ``group``: "432" for
    cubes and spheres, n = 4; "1" for the rest, n = 3) and two finer local grids; then the
    minimum and mean shell CC of the intensities over those shells (the VAE's cube-shell
    measure)."""
    from scipy.ndimage import map_coordinates

    from spiscape.emc3d import slicing
    from spiscape.metrics.volumes import centre_crop, shell_correlation
    from spiscape.orient import rotations
    from spiscape.phasing.align import centred_radius

    size = model.shape[0]
    ref = centre_crop(reference, size) if reference.shape[0] >= size else None
    if ref is None:
        return {}
    r = centred_radius(model.shape)
    qmin, qmax = float(np.ceil(q_range[0])), fraction * float(q_range[1])
    inside = ((r >= qmin) & (r <= qmax)).ravel()
    target = np.log(np.maximum(model, 1e-6 * model.max())).ravel()[inside]
    log_ref = np.log(np.maximum(ref, 1e-6 * ref.max()))
    points = slicing._grid_points(size)[:, inside]

    def score(quat):  # slicing.rotate restricted to the scored voxels
        coords = rotations.to_matrix(quat[None])[0] @ points + size // 2
        turned = map_coordinates(log_ref, coords, order=1, mode="nearest", prefilter=False)
        return float(np.corrcoef(turned, target)[0, 1])

    best, top = slicing.search_rotation(score, 4 if group == "432" else 3, group, (8.0, 2.0))
    q, cc = shell_correlation(model, slicing.rotate(ref, best[None]), qmin=qmin, qmax=qmax)
    return {"shell_cc_min": float(np.nanmin(cc)), "shell_cc_mean": float(np.nanmean(cc)),
            "log_cc": top}


def measured_q(detector) -> tuple[float, float]:
    from spiscape.io import read_detector

    det = read_detector(detector)
    q = np.sqrt(det.qx**2 + det.qy**2 + det.qz**2)[det.mask == 0]
    return float(q.min()), float(q.max())


def model_scores(intens: np.ndarray, models: np.ndarray, truth: Path | None,
                 q_range: tuple[float, float]) -> dict:
    """Per model: frames, purity (and over the pure populations: melting frames, a continuum
    between cube and sphere, left out), majority population and, for a cube majority, the shell
    CC against its population's true intensity averaged over its frames' sizes (the melting
    continuum has no one truth)."""
    if truth is None:
        return {}
    from spiscape.io.truth import read_truth
    from spiscape.metrics.volumes import size_averaged

    t = read_truth(truth)
    labels, names = np.asarray(t.label), t.label_names
    keep = models >= 0
    out = {"ari": float(adjusted_rand_score(labels[keep], models[keep]))}
    for k in range(len(intens)):
        mine = models == k
        if not mine.any():
            out[f"model{k}"] = {"frames": 0}
            continue
        counts = np.bincount(labels[mine], minlength=len(names))
        major = int(counts.argmax())
        entry = {"frames": int(mine.sum()), "purity": float(counts.max() / counts.sum()),
                 "majority": names[major]}
        pure = counts.copy()
        if "melting" in names:
            pure[names.index("melting")] = 0
        if pure.sum():
            entry["purity_pure"] = float(pure.max() / pure.sum())
            entry["majority_pure"] = names[int(pure.argmax())]
        volume = np.flatnonzero(np.asarray(t.volume_info["label"]) == major)
        if names[major] != "melting" and volume.size:
            sizes = np.asarray(t.frames["size"])[mine & (labels == major)]
            reference = size_averaged(np.asarray(t.volumes[volume[0]], dtype=np.float64), sizes)
            group = "432" if names[major] in ("cube", "sphere") else "1"
            entry.update(aligned_shell_cc(intens[k], reference, group, q_range))
        out[f"model{k}"] = entry
    return out


def refine_cube(photons, detector, truth, tmp: Path, name: str, quality: dict, args,
                q_range) -> dict:
    """The cube model's frames alone (--from-model) with the cube's point group at num_div 8:
    its shell CC against the true cube, and the time."""
    cube = [k for k in quality if k.startswith("model") and quality[k].get("majority") == "cube"]
    if not cube:
        return {}
    k = int(cube[0][len("model"):])
    out = tmp / f"{name}_cube_refined.h5"
    cmd = [sys.executable, "-m", "spiscape", "emc3d", "--photons", str(photons), "--detector",
           str(detector), "--out", str(out), "--num-models", "1", "--point-group", "m-3m",
           "--num-div", "8", "--iterations", "30", "--seed", str(args.seed), "--from-model",
           str(tmp / f"{name}_emc3d.h5"), str(k)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=emc_env(args.threads), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"emc3d --from-model failed:\n{proc.stderr[-3000:]}")
    from spiscape.io.emc3d import read_emc3d
    from spiscape.io.truth import read_truth
    from spiscape.metrics.volumes import size_averaged

    result = read_emc3d(out)
    t = read_truth(truth)
    labels = np.asarray(t.label)
    chosen = result.frames["model"] == 0
    sizes = np.asarray(t.frames["size"])[chosen & (labels == 0)]
    reference = size_averaged(np.asarray(t.volumes[0], dtype=np.float64), sizes)
    return {"model": k, "frames": int(chosen.sum()), "wall_seconds": time.perf_counter() - start,
            **aligned_shell_cc(result.intens[0], reference, "432", q_range)}


def to_size(models: np.ndarray, size: int) -> np.ndarray:
    """(K, V, V, V) models centred (q = 0 at V // 2) on a size³ grid: cropped, or padded with
    their edge values (Dragonfly's grid also spans the mask-1 and -2 pixels ours leaves out)."""
    models = np.asarray(models, dtype=np.float64)
    extra = size - models.shape[1]
    if extra < 0:
        lo = -extra // 2
        return models[:, lo:lo + size, lo:lo + size, lo:lo + size]
    if extra % 2:
        raise ValueError(f"cannot centre a {models.shape[1]}^3 grid on {size}^3")
    pad = extra // 2
    return np.pad(models, [(0, 0)] + [(pad, pad)] * 3, mode="edge")


def read_emc3d_models(path) -> np.ndarray:
    from spiscape.io.emc3d import read_emc3d

    return read_emc3d(path).intens


def start_models(photons, detector, args) -> np.ndarray:
    from spiscape.emc3d.run import EMC3D, EMC3DParams

    emc = EMC3D([photons], detector, EMC3DParams(num_models=args.num_models,
                                                  num_div=1, iterations=1, seed=args.seed))
    return emc.initial_state().models


def run_ours(photons, detector, out: Path, args, iterations: int | None = None,
             extra: tuple = ()) -> dict:
    cmd = [sys.executable, "-m", "spiscape", "emc3d", "--photons", str(photons), "--detector",
           str(detector), "--out", str(out), "--num-models", str(args.num_models),
           "--num-div", str(args.num_div), "--iterations", str(iterations or args.iterations),
           "--seed", str(args.seed), "--device", args.device, "--beta-start",
           str(args.beta_start), "--beta-jump",
           str(args.beta_jump), "--beta-period", str(args.beta_period), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=emc_env(args.threads), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"emc3d failed:\n{proc.stderr[-3000:]}")
    from spiscape.io.emc3d import read_emc3d

    result = read_emc3d(out, volumes=False)
    return {**per_iteration(result.log["seconds"]), "wall_seconds": wall,
            "seconds_per_iteration_all": result.log["seconds"].tolist(),
            "num_orientations": int(result.attrs["num_orientations"]),
            "beta_start": float(result.log["beta_mean"][0]), "models": result.frames["model"]}


def compare(name: str, args, tmp: Path) -> dict:
    photons, detector, truth = dataset_files(name)
    from spiscape.io import count_frames

    frames = count_frames([photons])
    row = {"dataset": name, "frames": frames, "num_models": args.num_models,
           "num_div": args.num_div, "iterations": args.iterations, "threads": args.threads}
    q_range = measured_q(detector)
    iterations, start, seed_models, extra = args.iterations, None, None, ()
    labels = args.init_labels
    if labels == "landscape":
        labels = str(HERE.parent / "results" / "demo" / "frames.h5" if name == "demo" else
                     HERE / "results" / "validation" / name / "frames.h5")
    if labels and not args.dragonfly:  # the workflow's protocol: one run from the labels
        extra = ("--init-labels", labels, "--init-by", args.init_by)
    elif labels:  # seeded: the landscape holds the frames for the label iterations; both
        # programs then start from those models (Dragonfly cannot hold frames to labels)
        from spiscape.emc3d.run import EMC3DParams

        seeded = EMC3DParams().label_iterations
        iterations = args.iterations - seeded
        if iterations < 1:
            raise SystemExit(f"--iterations must exceed the {seeded} label iterations")
        print(f"[emc3d] {name}: seeding from {labels} ({seeded} iterations)", flush=True)
        seed_out = tmp / f"{name}_seed.h5"
        stage = run_ours(photons, detector, seed_out, args, seeded,
                         ("--init-labels", labels, "--init-by", args.init_by))
        start, seed_models = seed_out, read_emc3d_models(seed_out)
        row.update(iterations=iterations, seeded={
            "labels": labels, "label_iterations": seeded, "wall_seconds": stage["wall_seconds"],
            "quality": model_scores(seed_models, stage["models"], truth, q_range)})
    print(f"[emc3d] {name}: spiscape", flush=True)
    if start:
        extra = ("--start-models", str(start))
    if args.refine_cubic:  # the workflow's: models m-3m explains refined alone, in their place
        extra = (*extra, "--refine-cubic")
    ours = run_ours(photons, detector, tmp / f"{name}_emc3d.h5", args, iterations, extra)
    row["spiscape"] = {k: v for k, v in ours.items() if k != "models"}
    row["spiscape"]["quality"] = model_scores(read_emc3d_models(tmp / f"{name}_emc3d.h5"),
                                              ours["models"], truth, q_range)
    if args.refine_cube and truth is not None:
        row["spiscape"]["cube_refined"] = refine_cube(photons, detector, truth, tmp, name,
                                                      row["spiscape"]["quality"], args, q_range)
    if args.dragonfly:
        import dragonfly_baseline as dfb

        if dfb.find_dragonfly() is None:
            print("Dragonfly is not installed:\n" + dfb.install_hint(), file=sys.stderr)
        else:
            print(f"[emc3d] {name}: Dragonfly", flush=True)
            start = seed_models if start else start_models(photons, detector, args)
            ours_size = start.shape[1]
            df = dfb.run_emc3d(photons, detector, tmp / f"dragonfly3d_{name}", args.num_models,
                               args.num_div, iterations, threads=args.threads,
                               beta_jump=args.beta_jump, beta_period=args.beta_period,
                               start_models=to_size(start, dfb.dragonfly_grid(detector)["size"]),
                               beta_start=(ours["beta_start"] if args.dragonfly_beta == "same"
                                           else None))
            entry = {**per_iteration(df["seconds_per_iteration"]),
                     "seconds_per_iteration_all": list(df["seconds_per_iteration"]),
                     "num_rotations": df["num_rotations"], "command": df["command"],
                     "beta_start": args.dragonfly_beta if args.dragonfly_beta == "auto" else
                     ours["beta_start"],
                     "grid": int(np.shape(df["intens"])[1]),
                     "same_start": "start_model_file" in (
                         tmp / f"dragonfly3d_{name}" / "config.ini").read_text()}
            # scored on our grid: its voxels beyond hold only pixels out of the likelihood
            entry["quality"] = model_scores(to_size(np.asarray(df["intens"]), ours_size),
                                            np.asarray(df["modes"]), truth, q_range)
            row["dragonfly"] = entry
            row["speedup_vs_dragonfly"] = (entry["seconds_per_iteration"]
                                           / row["spiscape"]["seconds_per_iteration"])
    return row


def describe(quality: dict) -> str:
    parts = []
    for key in sorted(k for k in quality if k.startswith("model")):
        m = quality[key]
        if not m.get("frames"):
            parts.append("empty")
            continue
        cc = f", shell CC min {m['shell_cc_min']:.2f}" if "shell_cc_min" in m else ""
        pure = (f" / {m['purity_pure']:.2f}" if "purity_pure" in m else "")
        parts.append(f"{m['majority']} {m['purity']:.2f}{pure}{cc}")
    return ", ".join(parts)


def table(rows: list[dict]) -> str:
    lines = ["| set | frames | K x orientations | spiscape s/it | Dragonfly s/it | ratio | "
             "ARI ours / Dragonfly | models ours: majority, purity / over pure populations | "
             "models Dragonfly |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours, df = r["spiscape"], r.get("dragonfly", {})
        lines.append(
            f"| {r['dataset']} | {r['frames']} | {r['num_models']} x "
            f"{ours['num_orientations']} | {ours['seconds_per_iteration']:.2f} | "
            f"{df.get('seconds_per_iteration', float('nan')):.2f} | "
            f"{r.get('speedup_vs_dragonfly', float('nan')):.1f}x | "
            f"{ours['quality'].get('ari', float('nan')):.2f} / "
            f"{df.get('quality', {}).get('ari', float('nan')):.2f} | "
            f"{describe(ours['quality'])} | {describe(df.get('quality', {}))} |")
    return "\n".join(lines)


def main() -> None:
    from spiscape.emc3d.run import EMC3DParams

    d = EMC3DParams()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["demo", "df80contam"])
    parser.add_argument("--num-models", type=int, default=2)
    parser.add_argument("--num-div", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"])
    parser.add_argument("--no-dragonfly", dest="dragonfly", action="store_false")
    parser.add_argument("--init-labels", default=None,
                        help="seed the models from this landscape (frames.h5 of the same "
                             "photons), or 'landscape': each dataset's own (the demo's "
                             "results/demo, the matrix's bench/results/validation/NAME); ours "
                             "holds the frames to it for the label iterations, then both "
                             "programs start from those models")
    parser.add_argument("--init-by", default="clusters", choices=["clusters", "coordinates"])
    parser.add_argument("--refine-cubic", action="store_true",
                        help="ours refines the models that m-3m explains (emc3d --refine-cubic, "
                             "no truth; the workflow's default) and is scored on them")
    parser.add_argument("--refine-cube", action="store_true",
                        help="then refine our cube model's frames alone with m-3m at num_div 8")
    parser.add_argument("--beta-start", default=str(d.beta_start),
                        help="ours' β start: 'mean', 'auto' or a number")
    parser.add_argument("--dragonfly-beta", default="same", choices=["same", "auto"],
                        help="Dragonfly's β start: ours' first β for every frame ('same'; "
                             "with ours' 'auto' the mean of its per-frame values), or its own "
                             "automatic per-frame β")
    parser.add_argument("--beta-jump", type=float, default=d.beta_jump)
    parser.add_argument("--beta-period", type=int, default=d.beta_period)
    parser.add_argument("--tmp", default=str(HERE / "results" / "emc3d_runs"))
    parser.add_argument("--json", default=str(HERE / "results" / "emc3d.json"))
    args = parser.parse_args()
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.datasets:  # the JSON after each dataset: a long run keeps what it has
        rows.append(compare(name, args, tmp))
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1, default=float))
    print(table(rows))
    for r in rows:
        if r["spiscape"].get("cube_refined"):
            c = r["spiscape"]["cube_refined"]
            print(f"{r['dataset']}: cube model {c['model']} refined alone (m-3m, num_div 8): "
                  f"{c['frames']} frames, shell CC min {c['shell_cc_min']:.3f} mean "
                  f"{c['shell_cc_mean']:.3f}, {c['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
