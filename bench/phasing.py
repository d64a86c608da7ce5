"""Phasing methods side by side: random-start iterative, the neural phaser alone, and the neural
phaser refined (``spiscape phase --method iterative | nn | nn+refine``), in one run.

Part 1, the demo's truth: the noiseless intensities of its 23 cube / melting / sphere states
(cropped to the VAE's 61^3 grid, with the VAE's measured |q| range 3.16 to 29 voxels: beamstop
and detector edge left free), plus the cube and the sphere averaged over a 3 % size spread.
For each method and state: the Porod volume's error against the true particle volume, the
density's Pearson CC with the true shape (voxelised on the phasing grid, aligned for shift and
inversion), ``converged`` and seconds. Part 2, a validation-matrix dataset's VAE volumes (default
``df64``, made by Dragonfly's simulator): each method through ``spiscape phase`` itself; the
phased sphere / cube volume ratio read at the pure cube and sphere latents against the truth's,
patterns not converged, the methods' agreement, and seconds per volume. Writes
bench/results/phasing.json and a Markdown table.

    python bench/phasing.py [--truth results/demo/data/truth.h5] [--vae-results DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
METHODS = ("iterative", "nn", "nn+refine")


def truth_density(label: int, t: float, params: dict, grid: int, voxel_nm: float) -> np.ndarray:
    """The state's uniform shape voxelised on the phasing grid (partial volumes)."""
    from spiscape.simulate import shapes as sh

    a = params["cube_edge_nm"]
    if label == 0:
        return sh.cube_density(a, grid, voxel_nm)
    if label == 2:
        v = float(sh.melting_volume(1.0, a, params["volume_growth"]))
        return sh.sphere_density(sh.sphere_diameter_for_volume(v), grid, voxel_nm)
    p = float(sh.superball_exponent(t, params["p_max"]))
    r = float(sh.melting_radius(t, a, params["p_max"], params["volume_growth"]))
    return sh.superball_density(r, p, grid, voxel_nm)


def aligned_cc(density: np.ndarray, reference: np.ndarray) -> float:
    """Pearson CC of a density with a reference after aligning shift and inversion."""
    from spiscape.phasing.align import align_starts

    both, _, _, _ = align_starts(np, np.stack([reference, density]).astype(np.float64))
    return float(np.corrcoef(both[0].ravel(), both[1].ravel())[0, 1])


def truth_part(args, phaser) -> list[dict]:
    from spiscape.io.truth import read_truth
    from spiscape.metrics.volumes import centre_crop, size_averaged
    from spiscape.phasing import PhasingParams, measured_shell_mask
    from spiscape.phasing.neural import NeuralSettings, phase_volume
    from spiscape.phasing.volume import particle_volume_nm3

    truth = read_truth(args.truth)
    info = truth.volume_info
    dq = float(truth.attrs["q_per_voxel_inv_nm"])
    sim = json.loads(truth.attrs["params"])
    voxel = 1.0 / (args.size * dq)
    names = ["cube", "melting", "sphere"]
    cases = []
    for k in np.flatnonzero(info["label"] <= 2):
        lab, t = int(info["label"][k]), float(info["t"][k])
        cases.append((names[lab] + (f" t={t:.2f}" if lab == 1 else ""), truth.volumes[k],
                      float(info["particle_volume_nm3"][k]), lab, t))
    rng = np.random.default_rng(0)
    for label in (0, 2):
        k = int(np.flatnonzero(info["label"] == label)[0])
        sizes = 1.0 + args.spread * rng.standard_normal(2000)
        cases.append((f"{names[label]}, {args.spread:.0%} size spread",
                      size_averaged(truth.volumes[k], sizes),
                      float(info["particle_volume_nm3"][k]), label, float(info["t"][k])))
    measured = measured_shell_mask((args.size,) * 3, args.q_min, args.q_max)
    from spiscape.backend import get_array_module

    params = PhasingParams(starts=args.starts)
    xp = get_array_module(args.device)
    neural = NeuralSettings(device="cpu" if xp is np else "cuda")
    rows = []
    for name, vol, true_v, label, t in cases:
        intens = centre_crop(vol, args.size).astype(np.float64)
        ref = truth_density(label, t, sim, args.size, voxel)
        for method in args.methods:
            t0 = time.perf_counter()
            res, used = phase_volume(intens, method, phaser, params, neural, xp=xp,
                                     measured=measured)
            seconds = time.perf_counter() - t0
            v = particle_volume_nm3(res.signed_density, dq, "porod", intens=intens,
                                    measured=measured)
            row = {"case": name, "method": method, "used": used, "true_nm3": true_v,
                   "porod_nm3": v, "porod_error": v / true_v - 1.0,
                   "density_cc": aligned_cc(res.density, ref), "converged": res.converged,
                   "seconds": seconds}
            rows.append(row)
            print(f"{name:24s} {method:10s} volume {100 * row['porod_error']:+6.2f} %  "
                  f"CC {row['density_cc']:.3f}  {'' if res.converged else 'NOT CONVERGED '}"
                  f"{used if used != method else ''} ({seconds:.2f} s)", flush=True)
    return rows


def vae_part(args, work: Path) -> dict:
    import h5py
    from volume_curve import curve_ratio

    res = Path(args.vae_results)
    out = {"results": str(res)}
    for method in args.methods:
        folder = work / method.replace("+", "_")
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "spiscape", "phase", "--volumes",
               str(res / "vae/volumes.h5"), "--out", str(folder / "phasing.h5"), "--curve",
               str(folder / "volume_curve.csv"), "--method", method, "--starts",
               str(args.starts)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        with h5py.File(folder / "phasing.h5", "r") as f:
            converged = f["converged"][()]
            used = [m.decode() for m in f["method"][()]]
            density = f["density"][()]
            per = float(f.attrs["seconds_per_pattern"])
        ratio = curve_ratio(res, Path(args.vae_truth), curve=folder / "volume_curve.csv")
        out[method] = {"ratio_error": ratio["ratio_error"], "cube_error": ratio["cube_error"],
                       "sphere_error": ratio["sphere_error"],
                       "not_converged": int((~converged).sum()), "patterns": int(converged.size),
                       "fell_back": int(sum(u != method for u in used)),
                       "seconds_per_volume": per, "wall_seconds": wall, "density": density}
        print(f"VAE volumes {method:10s} ratio error {100 * ratio['ratio_error']:+6.2f} %  "
              f"(cube {100 * ratio['cube_error']:+.1f} %, sphere {100 * ratio['sphere_error']:+.1f}"
              f" %), not converged {out[method]['not_converged']}/{converged.size}, "
              f"{per:.2f} s per volume", flush=True)
    if "iterative" in out:
        for method in args.methods:
            if method != "iterative":
                ccs = [aligned_cc(a, b) for a, b in zip(out[method]["density"],
                                                        out["iterative"]["density"],
                                                        strict=True)]
                out[method]["cc_with_iterative_median"] = float(np.median(ccs))
    for method in args.methods:
        out[method].pop("density")
    return out


def summarise(rows: list[dict], methods) -> dict:
    out = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        noiseless = [r for r in mine if "spread" not in r["case"]]
        errs = np.array([r["porod_error"] for r in noiseless])
        ccs = np.array([r["density_cc"] for r in noiseless])
        out[method] = {
            "max_abs_volume_error": float(np.max(np.abs(errs))),
            "median_abs_volume_error": float(np.median(np.abs(errs))),
            "min_density_cc": float(ccs.min()), "median_density_cc": float(np.median(ccs)),
            "not_converged": int(sum(not r["converged"] for r in mine)),
            "fell_back": int(sum(r["used"] != method for r in mine)),
            "seconds_per_volume": float(np.mean([r["seconds"] for r in mine])),
            "spread_cube_error": next(r["porod_error"] for r in mine
                                      if r["case"].startswith("cube,")),
            "spread_sphere_error": next(r["porod_error"] for r in mine
                                        if r["case"].startswith("sphere,")),
        }
    base = out.get("iterative", {}).get("seconds_per_volume")
    for method in methods:
        if base:
            out[method]["speedup"] = base / out[method]["seconds_per_volume"]
    return out


def main(argv=None):
    from spiscape.phasing.neural import load_phaser

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--truth", default=str(REPO / "results/demo/data/truth.h5"))
    p.add_argument("--size", type=int, default=61)
    p.add_argument("--q-min", type=float, default=3.16)
    p.add_argument("--q-max", type=float, default=29.0)
    p.add_argument("--starts", type=int, default=4)
    p.add_argument("--spread", type=float, default=0.03)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--phaser-model", default=None, help="default: the shipped model")
    p.add_argument("--vae-results", default=str(REPO / "bench/results/validation/df64"),
                   help="a validation run's results folder ('' to skip part 2)")
    p.add_argument("--vae-truth", default=str(REPO / "bench/data/validation/df64/truth.h5"))
    p.add_argument("--skip-truth", action="store_true",
                   help="only part 2 (the VAE volumes); part 1 kept from an existing --json")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="array module of part 1 (the network runs on cuda with gpu)")
    p.add_argument("--json", default=str(REPO / "bench/results/phasing.json"))
    args = p.parse_args(argv)
    phaser = load_phaser(args.phaser_model) if set(args.methods) - {"iterative"} else None
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    if args.skip_truth:
        result = json.loads(Path(args.json).read_text())
        summary = result["summary"]
    else:
        rows = truth_part(args, phaser)
        summary = summarise(rows, args.methods)
        result = {"grid": args.size, "q_range_voxels": [args.q_min, args.q_max],
                  "starts": args.starts, "phaser_model": phaser.path if phaser else None,
                  "phaser_sha256": phaser.sha256 if phaser else None, "rows": rows,
                  "summary": summary}
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.vae_results:
        with tempfile.TemporaryDirectory() as tmp:
            result["vae"] = vae_part(args, Path(tmp))
        Path(args.json).write_text(json.dumps(result, indent=1))
    lines = ["| method | demo truth: max / median \\|volume error\\| | density CC min / median "
             "| 3 % spread: cube, sphere | not converged (fell back) | s / volume | speed-up |"]
    lines.append("|---|---|---|---|---|---|---|")
    for method in args.methods:
        s = summary[method]
        lines.append(
            f"| {method} | {100 * s['max_abs_volume_error']:.1f} % / "
            f"{100 * s['median_abs_volume_error']:.1f} % | {s['min_density_cc']:.3f} / "
            f"{s['median_density_cc']:.3f} | {100 * s['spread_cube_error']:+.1f} %, "
            f"{100 * s['spread_sphere_error']:+.1f} % | {s['not_converged']} ({s['fell_back']}) "
            f"| {s['seconds_per_volume']:.2f} | {s.get('speedup', float('nan')):.1f}x |")
    if "vae" in result:
        vae = result["vae"]
        lines += ["", f"VAE volumes of `{Path(vae['results']).name}`:", "",
                  "| method | sphere / cube ratio error | cube, sphere volume error | "
                  "not converged (fell back) | density CC with iterative (median) | s / volume |",
                  "|---|---|---|---|---|---|"]
        for method in args.methods:
            v = vae[method]
            lines.append(
                f"| {method} | {100 * v['ratio_error']:+.1f} % | {100 * v['cube_error']:+.1f} %, "
                f"{100 * v['sphere_error']:+.1f} % | {v['not_converged']}/{v['patterns']} "
                f"({v['fell_back']}) | {v.get('cc_with_iterative_median', float('nan')):.3f} | "
                f"{v['seconds_per_volume']:.2f} |")
    table = "\n".join(lines)
    Path(args.json).with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
