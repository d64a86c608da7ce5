"""The volume step's own error on the validation matrix: the truth's intensities phased.

For each dataset, the true cube and sphere intensities at the mean size of that population's
frames (what a perfect decoder gives since each average is sliced at its own size,
``vae.options.size_correction: commonlines``; ``--sizes spread``: averaged over the frames'
sizes, :func:`spiscape.metrics.volumes.size_averaged`, what a decoder without it would at best
give), are cut to the VAE's grid and measured shells (``vae/volumes.h5``: its q per voxel,
``q_min_measured``, ``q_max_measured``) and phased by ``spiscape phase`` with the workflow's
phase options (``config/config.yaml``), exactly as the VAE's volumes are. The sphere / cube
volume ratio against the truth's is then the part of the matrix's ``ratio_error`` that no
decoder can remove; the table sets it beside the workflow's (decoded) figure.

``--grid detector`` asks what a VAE grid spanning the whole detector would give: the same
number of voxels, its q step f = (the detector's largest |q| of a used pixel) / (the VAE's
q_max_measured) detector pixels (at least 1), the truth resampled onto it by cubic splines.

    .venv/bin/python bench/volume_floor.py [--datasets demo df64 ...] [--grid detector]
        [--sizes mean|spread]

Needs each dataset's workflow results (``bench/validation.py``; the demo's ``make run``). Writes
``bench/results/volume_floor.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "src"))

import foreign_data  # noqa: E402
from volume_curve import curve_ratio  # noqa: E402

#: the validation matrix: the demo and bench/foreign_data.py's sets (as bench/validation.py)
MATRIX = ("demo", *foreign_data.DATASETS)


def locate(name: str, root: Path | None = None) -> tuple[Path, Path]:
    """(workflow results folder, truth.h5) of a matrix dataset; ``root`` the matrix's results
    (default bench/results/validation; the demo's own run otherwise)."""
    if name == "demo" and root is None:
        return REPO / "results/demo", REPO / "results/demo/data/truth.h5"
    root = HERE / "results/validation" if root is None else root
    if name == "demo":
        return root / name, root / name / "data/truth.h5"
    return root / name, HERE / "data/validation" / name / "truth.h5"


def phase_flags() -> list[str]:
    """The workflow's phase options as command-line flags."""
    options = yaml.safe_load((REPO / "config/config.yaml").read_text())["phase"]["options"]
    return [word for key, value in options.items()
            for word in (f"--{key.replace('_', '-')}", str(value))]


def detector_q_max(results: Path, name: str) -> float:
    """The largest |q| (pixels) of a used pixel of the dataset's detector."""
    from emc3d import measured_q

    return measured_q(results / "data/detector.h5" if name == "demo"
                      else HERE / "data/validation" / name / "detector.h5")[1]


def truth_intensities(attrs: dict, size: int, truth_path: Path, work: Path,
                      step: float = 1.0, spread: bool = False) -> tuple[Path, dict]:
    """A volumes file (z 0: cube, 1: sphere) of the truth's intensities at its frames' mean
    size (``spread``: averaged over their sizes) on the VAE's size³ grid (``attrs``: its
    volumes' attributes; its q step times ``step``, the same
    measured shells in q), and the truth's particle volumes."""
    from spiscape.io.truth import read_truth
    from spiscape.io.volumes import write_volumes
    from spiscape.metrics.volumes import on_grid, size_averaged

    truth = read_truth(truth_path)
    labels, names = np.asarray(truth.label), truth.label_names
    volume_label = np.asarray(truth.volume_info["label"])
    true_volume = np.asarray(truth.volume_info["particle_volume_nm3"])
    stack, volumes = [], {}
    for shape in ("cube", "sphere"):
        label = names.index(shape)
        index = int(np.flatnonzero(volume_label == label)[0])
        sizes = np.asarray(truth.frames["size"])[labels == label]
        sizes = sizes if spread else np.array([float(np.mean(sizes))])
        intens = size_averaged(np.asarray(truth.volumes[index], dtype=np.float64), sizes)
        # the particle at the mean size holds mean³ of the nominal volume
        scale = 1.0 if spread else float(sizes[0]) ** 3
        stack.append(on_grid(intens, size, step) if intens.shape[0] > size or step != 1.0
                     else intens)
        volumes[shape] = float(true_volume[index]) * scale
    path = work / "truth_volumes.h5"
    # a coarser step spans the detector up to the grid's edge: q_max_measured stays in voxels
    write_volumes(path, np.array([0.0, 1.0]), np.stack(stack), np.ones(2, dtype=bool),
                  q_per_voxel=attrs["q_per_voxel_inv_nm"] * step, point_group="m-3m",
                  attrs={"q_min_measured": attrs["q_min_measured"] / step,
                         "q_max_measured": attrs["q_max_measured"]})
    return path, volumes


def floor(name: str, grid: str = "vae", spread: bool = False,
          root: Path | None = None) -> dict:
    results, truth_path = locate(name, root)
    with h5py.File(results / "vae/volumes.h5", "r") as f:
        attrs, size = dict(f.attrs), f["intens"].shape[1]
    step = 1.0
    if grid == "detector":
        step = max(1.0, detector_q_max(results, name) / float(attrs["q_max_measured"]))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        volumes_file, true = truth_intensities(attrs, size, truth_path, work, step, spread)
        out = work / "phasing.h5"
        proc = subprocess.run([sys.executable, "-m", "spiscape", "phase", "--volumes",
                               str(volumes_file), "--out", str(out), *phase_flags()],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name}: spiscape phase failed:\n{proc.stderr[-2000:]}")
        with h5py.File(out, "r") as f:
            phased = f["volume"][()]
            methods = [m.decode() if isinstance(m, bytes) else str(m) for m in f["method"][()]]
            converged = f["converged"][()].tolist()
    cube, sphere = float(phased[0]), float(phased[1])
    row = {"dataset": name, "grid": grid, "q_step": step, "sizes": "spread" if spread else "mean",
           "methods": methods,
           "converged": converged,
           "cube_error": cube / true["cube"] - 1, "sphere_error": sphere / true["sphere"] - 1,
           "ratio_error": (sphere / cube) / (true["sphere"] / true["cube"]) - 1}
    try:
        decoded = curve_ratio(results, truth_path)
        row["decoded_ratio_error"] = decoded["ratio_error"]
    except (SystemExit, OSError, KeyError) as exc:
        row["decoded_note"] = str(exc)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(MATRIX))
    parser.add_argument("--grid", default="vae", choices=["vae", "detector"],
                        help="the VAE's grid, or one with as many voxels spanning the detector")
    parser.add_argument("--results", default=None,
                        help="the matrix's results folder (default bench/results/validation, "
                        "the demo's results/demo), e.g. a sweep's")
    parser.add_argument("--sizes", default="mean", choices=["mean", "spread"],
                        help="the truth at its frames' mean size, or averaged over their sizes")
    parser.add_argument("--json", default=None,
                        help="default bench/results/volume_floor[_detector].json")
    args = parser.parse_args()
    args.json = args.json or str(HERE / "results" / (
        "volume_floor.json" if args.grid == "vae" else "volume_floor_detector.json"))
    rows = []
    for name in args.datasets:
        print(f"[volume_floor] {name}", flush=True)
        rows.append(floor(name, args.grid, args.sizes == "spread",
                          Path(args.results).resolve() if args.results else None))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    print("| set | q step (pixels) | phasing | truth phased: cube | sphere | sphere / cube | "
          "workflow (decoded) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        decoded = r.get("decoded_ratio_error")
        print(f"| `{r['dataset']}` | {r['q_step']:.2f} | {', '.join(sorted(set(r['methods'])))} | "
              f"{r['cube_error']:+.1%} | {r['sphere_error']:+.1%} | {r['ratio_error']:+.1%} | "
              f"{'' if decoded is None else format(decoded, '+.1%')} |")


if __name__ == "__main__":
    main()
