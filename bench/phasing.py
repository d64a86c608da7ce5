"""Particle volumes from phasing the simulator's true intensities: the accuracy of the volume rules.

Takes the noiseless truth volumes of the default dataset (cube, the 21 melting levels, sphere),
cropped to the VAE's 61^3 grid, with the VAE's measured |q| range (3.16 to 29 voxels: beamstop and
detector edge left free), plus the cube and the sphere averaged over the data's 3 % size spread
(what a reconstruction from such frames can at best give); phases each (the default recipe) and
measures its volume with the ``porod`` and ``integrated`` rules. Writes
bench/results/phasing.json and a Markdown table.

    python bench/phasing.py [--truth results/demo/data/truth.h5 --starts 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    from spiscape.io.truth import read_truth
    from spiscape.metrics.volumes import centre_crop, size_averaged
    from spiscape.phasing import PhasingParams, measured_shell_mask, phase_pattern
    from spiscape.phasing.volume import particle_volume_nm3

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--truth", default=str(REPO / "results/demo/data/truth.h5"))
    p.add_argument("--size", type=int, default=61)
    p.add_argument("--q-min", type=float, default=3.16)
    p.add_argument("--q-max", type=float, default=29.0)
    p.add_argument("--starts", type=int, default=4)
    p.add_argument("--spread", type=float, default=0.03)
    p.add_argument("--json", default=str(REPO / "bench/results/phasing.json"))
    args = p.parse_args(argv)
    truth = read_truth(args.truth)
    info = truth.volume_info
    dq = float(truth.attrs["q_per_voxel_inv_nm"])
    names = ["cube", "melting", "sphere", "dimer", "rod"]
    cases = []
    for k in np.flatnonzero(info["label"] <= 2):
        name = names[info["label"][k]] + (f" t={info['t'][k]:.2f}" if info["label"][k] == 1 else "")
        cases.append((name, truth.volumes[k], float(info["particle_volume_nm3"][k])))
    rng = np.random.default_rng(0)
    for label in (0, 2):
        k = int(np.flatnonzero(info["label"] == label)[0])
        sizes = 1.0 + args.spread * rng.standard_normal(2000)
        cases.append((f"{names[label]}, {args.spread:.0%} size spread",
                      size_averaged(truth.volumes[k], sizes),
                      float(info["particle_volume_nm3"][k])))
    measured = measured_shell_mask((args.size,) * 3, args.q_min, args.q_max)
    rows = []
    for name, vol, true_v in cases:
        intens = centre_crop(vol, args.size).astype(np.float64)
        t0 = time.perf_counter()
        res = phase_pattern(intens, PhasingParams(starts=args.starts), measured=measured)
        row = {"case": name, "true_nm3": true_v, "seconds": time.perf_counter() - t0}
        for rule in ("porod", "integrated"):
            v = particle_volume_nm3(res.signed_density, dq, rule, intens=intens,
                                    measured=measured)
            row[rule] = v
            row[f"{rule}_error"] = v / true_v - 1.0
        rows.append(row)
        print(f"{name:28s} porod {100 * row['porod_error']:+6.2f} %  integrated "
              f"{100 * row['integrated_error']:+6.2f} %  ({row['seconds']:.1f} s)", flush=True)
    by = {r["case"]: r for r in rows}
    ratio = {rule: by["sphere"][rule] / by["cube"][rule] for rule in ("porod", "integrated")}
    spread = f", {args.spread:.0%} size spread"
    ratio_spread = {rule: by["sphere" + spread][rule] / by["cube" + spread][rule]
                    for rule in ("porod", "integrated")}
    true_ratio = by["sphere"]["true_nm3"] / by["cube"]["true_nm3"]
    noiseless = [r for r in rows if "spread" not in r["case"]]
    result = {"grid": args.size, "q_range_voxels": [args.q_min, args.q_max],
              "starts": args.starts, "rows": rows, "true_ratio": true_ratio,
              "ratio": ratio, "ratio_size_spread": ratio_spread}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    lines = ["| rule | noiseless volumes: error range | sphere / cube (true "
             f"{true_ratio:.3f}) | with {args.spread:.0%} size spread: cube, sphere | "
             "sphere / cube |", "|---|---|---|---|---|"]
    for rule in ("porod", "integrated"):
        errs = [100 * r[f"{rule}_error"] for r in noiseless]
        lines.append(
            f"| {rule} | {min(errs):+.2f} % to {max(errs):+.2f} % | {ratio[rule]:.4f} | "
            f"{100 * by['cube' + spread][f'{rule}_error']:+.1f} %, "
            f"{100 * by['sphere' + spread][f'{rule}_error']:+.1f} % | "
            f"{ratio_spread[rule]:.4f} |")
    table = "\n".join(lines)
    Path(args.json).with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
