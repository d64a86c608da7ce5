"""How close the demo's class averages are to the truth: ring levels of the pure averages.

For the averages whose frames are >= 80 % one pure state (cube, sphere; by occupancy, from the
truth's frame labels), each average is compared with the truth's intensity of that state
(averaged over the sizes of its frames, as the data show it) sliced on the Ewald sphere at the
average's orientation (``orientation.h5``). Both are scaled to the same sum over 3-8 px, and the
ratio of their means in 1-px rings is the ring level (1: the average has the truth's radial
shape). The EMC's bilinear merge blurs a steep fall-off: merged cube averages read low and then
high across the cube's central speckle; ``classify2d --sharpen-iterations`` removes that
(docs/methods.md, "Sharp averages"). Also reported: the fraction of measured pixels that are
exactly 0 (what a deblurring that is not held back where few photons land produces) and the
median log-intensity correlation with the slice per ring. Writes ``bench/results/averages.json``
and a table.

    python bench/averages.py [--results results/demo]

Run after ``make run`` (or ``snakemake results/demo/orientation.h5``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
STATES = {"cube": 0, "sphere": 2}


def ring_scores(average, reference, support, radius, rings, norm=(3, 8)):
    """(levels, log-CC) per ring of one average against its reference slice (same shape)."""
    inner = support & (radius >= norm[0]) & (radius < norm[1])
    scale = average[inner].sum() / reference[inner].sum()
    floor = 1e-3 * average[inner].mean()
    levels, ccs = [], []
    for q in rings:
        ring = support & (radius >= q) & (radius < q + 1)
        levels.append(average[ring].mean() / (scale * reference[ring].mean()))
        ccs.append(np.corrcoef(np.log(average[ring] + floor),
                               np.log(scale * reference[ring] + floor))[0, 1])
    return np.array(levels), np.array(ccs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(REPO / "results/demo"))
    p.add_argument("--json", default=str(REPO / "bench/results/averages.json"))
    p.add_argument("--max-ring", type=int, default=26)
    args = p.parse_args(argv)
    from spiscape.embed.landscape import average_truth
    from spiscape.io import read_detector
    from spiscape.io.replicate import read_replicates
    from spiscape.io.truth import read_truth
    from spiscape.orient.rotations import to_matrix
    from spiscape.vae.model import ewald_grid, slice_volumes
    from spiscape.vae.scoring import truth_reference

    res = Path(args.results)
    truth = read_truth(res / "data/truth.h5")
    det = read_detector(res / "data/detector.h5")
    with h5py.File(res / "averages.h5", "r") as f:
        intens, support = f["intens"][()], f["support"][()].astype(bool)
        replicate, klass = f["replicate"][()], f["class"][()]
    with h5py.File(res / "orientation.h5", "r") as f:
        quaternion = f["quaternion"][()]
    rep_files = sorted((res / "classify2d").glob("rep*.h5"))
    with h5py.File(rep_files[0], "r") as f:
        params = json.loads(f.attrs["params"])
    fractions = average_truth(len(replicate), read_replicates(rep_files), replicate, klass,
                              truth.label, truth.t, len(truth.label_names) or 5)["fractions"]
    size = intens.shape[1]
    grid = torch.as_tensor(ewald_grid(size, det.detd, det.ewald_rad).reshape(3, -1),
                           dtype=torch.float32)
    c = (size - 1) / 2.0
    radius = np.hypot(*np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij"))
    rings = np.arange(3, args.max_ring + 1)
    result = {"results": str(res), "rings_px": rings.tolist(),
              "sharpen": {k: v for k, v in params.items() if k.startswith("sharpen_")}}
    for name, label in STATES.items():
        pure = np.flatnonzero(fractions[:, label] >= 0.8)
        if not pure.size:
            continue
        _, _, ref = truth_reference(truth, label, True, 61)
        volumes = torch.as_tensor(ref[None], dtype=torch.float32).expand(pure.size, -1, -1, -1)
        rot = torch.as_tensor(to_matrix(quaternion[pure]), dtype=torch.float32)
        slices = slice_volumes(volumes, grid, rot).numpy().reshape(-1, size, size)
        scores = [ring_scores(intens[a], s, support, radius, rings)
                  for a, s in zip(pure, slices, strict=True)]
        measured = support & (radius >= 3)
        result[name] = {
            "averages": int(pure.size),
            "ring_level_median": np.median([s[0] for s in scores], axis=0).tolist(),
            "ring_log_cc_median": np.median([s[1] for s in scores], axis=0).tolist(),
            "zero_fraction_mean": float(np.mean([np.mean(intens[a][measured] <= 0)
                                                 for a in pure])),
        }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    shown = rings[rings <= 18]
    table = ("| state | averages | pixels = 0 | ring level (median) at " +
             " / ".join(f"{q}" for q in shown) + " px |\n|---|---|---|---|\n")
    for name in STATES:
        if name in result:
            r = result[name]
            levels = " / ".join(f"{v:.2f}" for v in r["ring_level_median"][:shown.size])
            table += (f"| {name} | {r['averages']} | {100 * r['zero_fraction_mean']:.0f} % | "
                      f"{levels} |\n")
    Path(args.json).with_suffix(".md").write_text(table)
    print(f"sharpening: {result['sharpen'] or 'none (merged models)'}")
    print(table)


if __name__ == "__main__":
    main()
