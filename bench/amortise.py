"""Amortised inference against the 2D route, on the demo and validation-matrix datasets.

For each dataset whose workflow results exist (the demo's ``results/demo``, the matrix's
``bench/results/validation/<name>``), ``spiscape amortise`` is trained from the dataset's VAE
decoder on its frames with the default settings, then scored against the simulator's truth:

* median orientation error of the cube frames modulo m-3m (the encoder's best hypothesis, and
  after the local refinement), and the share within 5°;
* per-frame |Spearman(z, t)| over cube, melting and sphere frames (encoder's z, the refined
  posterior mean) beside the 2D route's per-frame latent (``frames.h5``);
* the decoded cube's smallest shell CC to 0.7 q_max against the truth (beside the VAE's);
* the phased sphere / cube volume ratio against the truth's (the volumes decoded at the cube's
  and the sphere's population z, ``spiscape phase`` with the workflow's phase options);
* training frames/s on this machine, and peak memory of a one-epoch run on the frames and on
  four times as many (the same photon file listed four times): flat when it streams.

    python bench/amortise.py                       # demo and df64
    python bench/amortise.py --only demo --epochs 30
    python bench/amortise.py --only df80contam      # any matrix dataset run by bench/validation.py

Writes ``bench/results/amortise.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

MATRIX = ("df64", "df128b2", "df96low", "df80contam", "df128low", "sim72lowphot",
          "sim64spread")
DATASETS = {"demo": (REPO / "results/demo", REPO / "results/demo/data"),
            **{name: (REPO / "bench/results/validation" / name,
                      REPO / "bench/data/validation" / name) for name in MATRIX}}
DEFAULT = ("demo", "df64")


def spiscape(*words, log) -> float:
    """Run ``python -m spiscape words`` in a child; returns its wall time (s)."""
    tic = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run([sys.executable, "-m", "spiscape", *map(str, words)], check=True,
                       stderr=handle, stdout=handle)
    return time.perf_counter() - tic


def peak_rss_mb(*words, log) -> float:
    """Peak resident memory (MB) of one child run."""
    code = ("import resource, sys, runpy; sys.argv = ['spiscape', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('spiscape', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    with open(log, "w") as handle:
        out = subprocess.run([sys.executable, "-c", code, *map(str, words)], check=True,
                             stdout=subprocess.PIPE, stderr=handle, text=True).stdout
    return int(out.split("PEAK")[-1]) / 1024.0


def bench_dataset(name: str, epochs: int, out_root: Path, threads: int,
                  memory: bool = True) -> dict:
    res, data = DATASETS[name]
    vae = res / "vae/model.pt"
    if not vae.exists():
        raise SystemExit(f"{name}: no {vae}; run the workflow first (make run, or "
                         f"python bench/validation.py --only {name})")
    out = out_root / name
    common = ["--photons", data / "photons.h5", "--detector", data / "detector.h5",
              "--init-vae", vae, "--threads", threads]
    seconds = spiscape("amortise", *common, "--out-dir", out, "--landscape", res / "frames.h5",
                       "--truth", data / "truth.h5", "--epochs", epochs,
                       log=out_root / f"{name}.log")
    report = json.loads((out / "training.json").read_text())
    scores = report["scores"]
    history = report["history"]
    vae_scores = json.loads((res / "vae/training.json").read_text()).get("scores", {})
    row = {"dataset": name, "epochs": epochs, "seconds": seconds,
           "frames_per_s": float(sorted(h["frames_per_s"] for h in history)[len(history) // 2]),
           "vae_cube_shell_cc_min": vae_scores.get("cube_shell_cc_min"), **scores,
           **phased_ratio(name, out_root)}
    if not memory:
        return row
    # memory: one epoch, no refinement, on the frames and on four copies of them
    listing = out_root / f"{name}_x4.lst"
    listing.write_text("\n".join([str(data / "photons.h5")] * 4) + "\n")
    for tag, photons in (("x1", data / "photons.h5"), ("x4", listing)):
        row[f"peak_rss_mb_{tag}"] = peak_rss_mb(
            "amortise", "--photons", photons, *common[2:], "--out-dir", out_root / f"mem_{tag}",
            "--epochs", 1, "--no-refine", "--no-figures", log=out_root / f"{name}_mem_{tag}.log")
    return row


def rescore(name: str, out_root: Path) -> dict:
    """Scores of a finished run again (after a change of the scorers), without training."""
    sys.path.insert(0, str(REPO / "src"))
    from spiscape.amortise.run import load_model
    from spiscape.amortise.scoring import score_against_truth
    from spiscape.io.amortise import read_amortise
    from spiscape.io.frames import read_landscape

    res, data = DATASETS[name]
    out = out_root / name
    model = load_model(out / "model.pt")
    frames = read_amortise(out / "amortise.h5")
    qnorm = model.q.norm(dim=0).numpy()
    return score_against_truth(frames, data / "truth.h5", model, qnorm,
                               read_landscape(res / "frames.h5"))


def phased_ratio(name: str, out_root: Path) -> dict:
    """Sphere / cube volume ratio of the amortised decoder, as the matrix scores the VAE's: the
    volumes at the cube's and the sphere's population z (the z that explains 400 of their
    frames best at their refined poses, :func:`spiscape.amortise.run.population_latent`),
    phased by ``spiscape phase`` with the workflow's phase options, Porod volumes against the
    truth's."""
    sys.path.insert(0, str(REPO / "src"))
    import h5py
    import numpy as np
    import torch
    from volume_curve import read_curve

    from spiscape.amortise.data import select_pixels
    from spiscape.amortise.run import latent_grid, load_model, population_latent
    from spiscape.io import read_detector
    from spiscape.io.amortise import read_amortise
    from spiscape.io.photons import PhotonDataset
    from spiscape.io.truth import read_truth
    from spiscape.io.volumes import write_volumes

    _, data = DATASETS[name]
    out = out_root / name
    model = load_model(out / "model.pt")
    frames = read_amortise(out / "amortise.h5")
    truth = read_truth(data / "truth.h5", volumes=False)
    label = np.asarray(truth.label)
    pixels = select_pixels(read_detector(data / "detector.h5"), model.volume_size)
    grid = latent_grid(frames["z"], 81)
    rng = np.random.default_rng(0)
    with PhotonDataset(data / "photons.h5") as photons:
        z = np.array([[population_latent(
            model, photons, pixels, np.sort(rng.choice(np.flatnonzero(label == k), size=min(
                400, int((label == k).sum())), replace=False)), frames["quaternion"], grid)]
            for k in (0, 2)])
    with torch.no_grad():
        vols = model.volumes(torch.as_tensor(z, dtype=torch.float32)).numpy()
    qn = model.q.norm(dim=0).numpy()
    ends = out / "ends.h5"
    write_volumes(ends, z, vols, np.ones(2, dtype=bool), truth.attrs["q_per_voxel_inv_nm"],
                  attrs={"q_min_measured": float(qn.min()), "q_max_measured": float(qn.max())})
    spiscape("phase", "--volumes", ends, "--out", out / "ends_phasing.h5", "--curve",
             out / "ends.csv", "--recipe", "100 DM 100 RAAR 100 ER", "--starts", 4, "--seed", 1,
             log=out_root / f"{name}_phase.log")
    zc, vc, converged = read_curve(out / "ends.csv")
    with h5py.File(data / "truth.h5", "r") as f:
        vlabel, true_v = f["volumes/label"][()], f["volumes/particle_volume_nm3"][()]
    true_ratio = true_v[vlabel == 2][0] / true_v[vlabel == 0][0]
    if len(vc) < 2 or not converged.all():
        return {"ratio_note": "a phasing did not converge"}
    first_is_cube = abs(zc[0] - z[0, 0]) < 1e-4
    cube, sphere = (vc[0], vc[1]) if first_is_cube else (vc[1], vc[0])
    return {"cube_z": float(z[0, 0]), "sphere_z": float(z[1, 0]),
            "ratio_error": float(sphere / cube / true_ratio - 1.0),
            "cube_volume_error": float(cube / true_v[vlabel == 0][0] - 1.0),
            "sphere_volume_error": float(sphere / true_v[vlabel == 2][0] - 1.0)}


def table(rows: list[dict]) -> str:
    cols = [("dataset", "{}"), ("epochs", "{}"), ("frames_per_s", "{:.0f}"),
            ("cube_orientation_encoder_median_deg", "{:.1f}"),
            ("cube_orientation_median_deg", "{:.1f}"), ("cube_orientation_within_5deg", "{:.2f}"),
            ("cube_orientation_twin_median_deg", "{:.1f}"),
            ("cube_orientation_twin_within_5deg", "{:.2f}"),
            ("rho_z_encoder", "{:.3f}"), ("rho_z", "{:.3f}"), ("rho_latent_2d_route", "{:.3f}"),
            ("cube_shell_cc_min", "{:.3f}"), ("vae_cube_shell_cc_min", "{:.3f}"),
            ("ratio_error", "{:+.1%}"),
            ("peak_rss_mb_x1", "{:.0f}"), ("peak_rss_mb_x4", "{:.0f}"), ("seconds", "{:.0f}")]
    head = ["dataset", "epochs", "train frames/s", "cube err enc (°)", "cube err refined (°)",
            "≤ 5°", "modulo the Friedel twin (°)", "≤ 5°", "ρ z enc", "ρ z refined",
            "ρ 2D route", "cube shell CC", "VAE's", "sphere/cube volume error",
            "RSS MB (N)", "RSS MB (4N)", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = []
        for key, fmt in cols:
            v = r.get(key)
            cells.append("—" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(DATASETS), default=list(DEFAULT),
                   help="datasets (the matrix's need bench/validation.py --only NAME first)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out", default=str(REPO / "bench/results/amortise"))
    p.add_argument("--json", default=str(REPO / "bench/results/amortise.json"))
    p.add_argument("--no-memory", action="store_true",
                   help="skip the two one-epoch runs that measure peak memory")
    p.add_argument("--rescore", action="store_true",
                   help="score finished runs again (no training)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = {}
    if Path(args.json).exists():
        previous = {r["dataset"]: r for r in json.loads(Path(args.json).read_text())["rows"]}
    for name in args.only:
        if args.rescore:
            previous[name] = {**previous[name], **rescore(name, out),
                              **phased_ratio(name, out)}
        else:
            print(f"[amortise] {name}: training {args.epochs} epochs", flush=True)
            previous[name] = bench_dataset(name, args.epochs, out, args.threads,
                                           memory=not args.no_memory)
        print(f"[amortise] {name}: {json.dumps(previous[name], default=float)}", flush=True)
        rows = [previous[n] for n in DATASETS if n in previous]  # (all measured so far)
        Path(args.json).write_text(json.dumps({"machine": os.uname().nodename, "rows": rows},
                                              indent=1, default=float))
    print(table([previous[n] for n in DATASETS if n in previous]))


if __name__ == "__main__":
    main()
