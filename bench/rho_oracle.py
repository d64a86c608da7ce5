"""How well could any method order the frames by shape? The per-frame |Spearman| with t of an
oracle that knows everything but the shape.

    .venv/bin/python bench/rho_oracle.py                      # the matrix and the demo
    .venv/bin/python bench/rho_oracle.py --only df128low --pose-step 5   # + orientation unknown
    .venv/bin/python bench/rho_oracle.py --truth-decoder --tilt 0        # + the run's posterior

For every cube, melting and sphere frame the oracle knows the truth's volumes of the series
(cube, each melting level, sphere), the frame's orientation and particle size, and scores the
frame's photons under each volume with the multinomial likelihood (the photons' distribution
over the recorded pixels, as the pipeline scores them: without the fluence, which the data do
not give). Its latent is the posterior mean of t under the population's true mixing proportions
(the Bayes estimate). Spearman's ρ of that latent with t over the series frames is what a
perfect decoder with perfect orientations could reach from these photons, not a strict bound
(another estimate of the same posterior could rank a little differently), and no method that
must also find the orientation and the volumes does better in practice. Beside it: the same
oracle's Somers' D, and ``rho_ties`` (a perfect continuous latent, bench/validation.py).

``--pose-step D``: also the oracle with the orientation unknown, its likelihood averaged over a
D-degree grid of the asymmetric unit of 432 (size still known): what a search over all
orientations costs with perfect volumes (df128low: 13 min on 2 cores at 5 degrees).
``--truth-decoder``: the pipeline's own per-frame posterior (:mod:`spiscape.vae.frame_posterior`
with the classes of the --results run: their refined orientations, size offsets and the frames'
tilt) with the truth's volumes in the place of the decoder: what the decoder costs against what
the classes' orientations cost (docs/validation.md, "How far from what the photons allow").

Writes a JSON (one row per set) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

MATRIX = ("demo", "df64", "df128b2", "df96low", "df80contam", "df128low", "sim72lowphot",
          "sim64spread")
CHUNK = 256


def recorded(det, photons, frames, q_max=None):
    """q (3, P), relative efficiency (P,) and the frames' counts (CSR, frames x P) of the
    recorded pixels (those within ``q_max`` pixels of the centre, when given)."""
    from spiscape.simulate.detector import q_magnitude

    keep = det.mask < 2
    if q_max is not None:
        keep &= q_magnitude(det) <= q_max
    pix = np.flatnonzero(keep)
    corr = det.corr[pix] / det.corr[pix].mean()
    counts = photons.select(frames).to_csr(np.float64)[:, pix].tocsr()
    return np.stack([det.qx, det.qy, det.qz])[:, pix], corr, counts


def log_probabilities(lam: np.ndarray) -> np.ndarray:
    """log(lambda / sum lambda) over the pixels of each row, floored at 1e-12 of its largest."""
    lam = np.maximum(lam, 1e-12 * lam.max(axis=1, keepdims=True) + 1e-300)
    return np.log(lam) - np.log(lam.sum(axis=1, keepdims=True))


def oracle_log_likelihood(truth, det, photons, states, frames, q_max=None) -> np.ndarray:
    """(len(frames), len(states)): log of each frame's multinomial likelihood under each state's
    volume at the frame's true orientation and size (constant terms dropped), over the recorded
    pixels (those within ``q_max`` pixels of the centre, when given)."""
    from spiscape.simulate import frames as fr

    q, corr, counts = recorded(det, photons, frames, q_max)
    rot = fr.quaternion_to_matrix(truth.quaternion[frames])
    size = np.asarray(truth.size, dtype=np.float64)[frames]
    out = np.empty((frames.size, len(states)))
    for j, k in enumerate(states):
        vol = truth.volumes[k]
        for first in range(0, frames.size, CHUNK):
            sl = slice(first, min(first + CHUNK, frames.size))
            logp = log_probabilities(fr.expected_photons(vol, q, corr, rot[sl], size[sl],
                                                         np.ones(sl.stop - first)))
            out[sl, j] = np.asarray(counts[sl].multiply(logp).sum(axis=1)).ravel()
    return out


def unknown_pose_log_likelihood(truth, det, photons, states, frames, step: float,
                                size_bins: int = 5, block: int = 1024) -> np.ndarray:
    """As :func:`oracle_log_likelihood` but with the orientation unknown: the likelihood averaged
    over a near-uniform grid of ``step`` degrees in the asymmetric unit of 432 (the series'
    volumes are m-3m), the size still known (binned into ``size_bins`` quantile bins)."""
    from scipy.special import logsumexp

    from spiscape.simulate import frames as fr
    from spiscape.vae.frame_posterior import global_orientations

    q, corr, counts = recorded(det, photons, frames)
    rot = fr.quaternion_to_matrix(global_orientations("m-3m", step))
    size = np.asarray(truth.size, dtype=np.float64)[frames]
    edges = np.quantile(size, np.linspace(0, 1, size_bins + 1))
    which = np.clip(np.searchsorted(edges, size, side="right") - 1, 0, size_bins - 1)
    out = np.empty((frames.size, len(states)))
    for j, k in enumerate(states):
        vol = truth.volumes[k]
        for b in range(size_bins):
            rows = np.flatnonzero(which == b)
            if not rows.size:
                continue
            centre = float(np.median(size[rows]))
            parts = []
            for first in range(0, len(rot), block):
                r = rot[first:first + block]
                logp = log_probabilities(fr.expected_photons(
                    vol, q, corr, r, np.full(len(r), centre), np.ones(len(r))))
                parts.append(np.asarray(counts[rows] @ logp.T))
            out[rows, j] = logsumexp(np.concatenate(parts, axis=1), axis=1) - np.log(len(rot))
    return out


def oracle(name: str, data: Path, results: Path, q_max=None, pose_step=None) -> dict:
    from scipy.stats import somersd
    from validation import DEMO, rho_ties, truth_path

    from spiscape.io import read_detector, read_photons
    from spiscape.io.truth import read_truth
    from spiscape.metrics.landscape import melting_spearman, series_frames

    folder = (results / name / "data") if name == DEMO else data / name
    t0 = time.perf_counter()
    truth = read_truth(truth_path(name, data, results))
    det = read_detector(folder / "detector.h5")
    photons = read_photons(folder / "photons.h5", num_pix=det.num_pix)
    t = np.asarray(truth.t, dtype=np.float64)
    use = series_frames(truth.label, t)
    frames = np.flatnonzero(use)
    shape = np.asarray(truth.shape_index)
    states = np.unique(shape[frames])  # the series' volumes the frames were made from
    state_t = np.asarray(truth.volume_info["t"], dtype=np.float64)[states]
    prior = np.array([(shape[frames] == k).mean() for k in states])
    def posterior(loglik):
        logpost = loglik + np.log(prior)[None]
        post = np.exp(logpost - logpost.max(axis=1, keepdims=True))
        return post / post.sum(axis=1, keepdims=True)

    post = posterior(oracle_log_likelihood(truth, det, photons, states, frames, q_max))
    latent = np.full((t.size, 1), np.nan)
    latent[frames, 0] = post @ state_t
    best = state_t[np.argmax(post, axis=1)]
    extra = {}
    if pose_step:
        blind = np.full((t.size, 1), np.nan)
        blind[frames, 0] = posterior(unknown_pose_log_likelihood(
            truth, det, photons, states, frames, pose_step)) @ state_t
        extra = {"rho_oracle_unknown_pose": melting_spearman(blind, truth.label, t)[
            "best_abs_rho"], "pose_step_deg": pose_step}
    return {**extra,
        "dataset": name,
        "frames": int(frames.size),
        "states": int(states.size),
        "mean_photons": float(photons.photons_per_frame()[frames].mean()),
        "rho_oracle": melting_spearman(latent, truth.label, t)["best_abs_rho"],
        "somers_oracle": abs(float(somersd(t[frames], latent[frames, 0]).statistic)),
        "rho_ties": rho_ties(latent, truth),
        "map_correct": float(np.mean(best == t[frames])),
        "q_max": q_max,
        "seconds": time.perf_counter() - t0,
    }


class TruthSeries(torch.nn.Module):
    """The truth's series volumes in the place of the VAE's decoder (the interface
    :func:`spiscape.vae.frame_posterior.posterior_latents` reads): latent z = a state's t."""

    def __init__(self, model, truth, states, step: float):
        from spiscape.metrics.volumes import on_grid

        super().__init__()
        self.q, self.volume_size, self.octant = model.q, model.volume_size, False
        self.t = np.asarray(truth.volume_info["t"], dtype=np.float64)[states]
        self.vols = torch.stack([torch.as_tensor(on_grid(truth.volumes[k], model.volume_size,
                                                         step), dtype=torch.float32)
                                 for k in states])

    def symmetric(self, z):
        idx = np.abs(z[:, :1].cpu().numpy() - self.t[None]).argmin(axis=1)
        return self.vols[torch.as_tensor(idx)]

    def tilts(self):
        return None


def truth_decoder(name: str, data: Path, results: Path, tilt=None) -> dict:
    """ρ of the pipeline's own per-frame posterior (the run's classes, refined orientations, size
    offsets and frame tilt) with the truth's volumes in the place of the decoder: what the
    decoder costs, against what the classes' orientations cost."""
    import h5py
    from validation import DEMO, truth_path

    from spiscape.io import read_detector
    from spiscape.io.commonlines import read_pair_scales
    from spiscape.io.truth import read_truth
    from spiscape.io.volumes import read_latent
    from spiscape.io.weights import load_plain
    from spiscape.metrics.landscape import melting_spearman, series_frames
    from spiscape.vae import data as vdata
    from spiscape.vae import frame_posterior as fp
    from spiscape.vae.train import load_model

    res = results / name
    folder = (res / "data") if name == DEMO else data / name
    t0 = time.perf_counter()
    truth = read_truth(truth_path(name, data, results))
    det = read_detector(folder / "detector.h5")
    model = load_model(res / "vae/model.pt")
    cfg = load_plain(res / "vae/model.pt", "model")["train_config"]
    latent = read_latent(res / "vae/latent.h5")
    inputs = vdata.read_inputs(res / "averages.h5", res / "orientation.h5",
                               res / "embedding.h5", "auto")
    sel = latent["selected"]
    log_scale = np.zeros(sel.size)
    if cfg["size_correction"] == "commonlines":
        scales = read_pair_scales(res / "commonlines.h5", inputs.replicate, inputs.klass)
        log_scale = vdata.size_offsets(scales, inputs.labels, sel, inputs.frames)
    quaternion = latent.get("quaternion_refined", inputs.quaternion)
    classes = fp.Classes(replicate=inputs.replicate[sel], klass=inputs.klass[sel],
                         quaternion=quaternion[sel], log_scale=log_scale[sel])
    if tilt is None:  # the run's own
        with h5py.File(res / "vae/frame_latent.h5", "r") as f:
            tilt = float(f.attrs.get("tilt_deg", 0.0))
    t = np.asarray(truth.t, dtype=np.float64)
    frames = np.flatnonzero(series_frames(truth.label, t))
    states = np.unique(np.asarray(truth.shape_index)[frames])
    series = TruthSeries(model, truth, states, float(cfg["q_step"]))
    reps = sorted(str(p) for p in (res / "classify2d").glob("rep*.h5"))
    post = fp.posterior_latents(series, det, reps, [str(folder / "photons.h5")], classes,
                                series.t[:, None], truth.num_frames, q_min=float(cfg["q_min"]),
                                q_step=float(cfg["q_step"]), tilts=fp.tilt_rotations(tilt))
    return {"rho_truth_decoder": melting_spearman(post["latent"], truth.label, t)["best_abs_rho"],
            "truth_decoder_tilt_deg": tilt, "truth_decoder_seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "bench/data/validation",
                        help="the matrix's data (bench/foreign_data.py)")
    parser.add_argument("--results", type=Path, default=REPO / "bench/results/validation",
                        help="the matrix's results (the demo's simulated data is in there)")
    parser.add_argument("--only", nargs="+", default=None, choices=MATRIX)
    parser.add_argument("--q-max", type=float, default=None,
                        help="use only the pixels within this |q| (detector pixels): e.g. 29, "
                             "what the VAE's 61^3 grid at q step 1 reaches")
    parser.add_argument("--pose-step", type=float, default=None,
                        help="also the oracle with the orientation unknown: its likelihood "
                             "averaged over a grid of this many degrees (e.g. 5)")
    parser.add_argument("--truth-decoder", action="store_true",
                        help="also run the pipeline's per-frame posterior of the --results run "
                             "with the truth's volumes in the place of its decoder")
    parser.add_argument("--tilt", type=float, default=None,
                        help="with --truth-decoder: the frames' tilt (degrees; default the run's)")
    parser.add_argument("--json", type=Path, default=REPO / "bench/results/rho_oracle.json")
    args = parser.parse_args(argv)
    rows = []
    for name in args.only or MATRIX:
        row = oracle(name, args.data, args.results, args.q_max, args.pose_step)
        if args.truth_decoder:
            row.update(truth_decoder(name, args.data, args.results, args.tilt))
        print(f"{name}: oracle rho {row['rho_oracle']:.3f} ({row['seconds']:.0f} s)", flush=True)
        rows.append(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows}, indent=1))
    decoded = "rho_truth_decoder" in rows[0]
    print("\n| set | photons | rho_oracle | somers_oracle | rho_ties | MAP state correct |"
          + (" rho_truth_decoder (tilt) |" if decoded else ""))
    print("|---|---|---|---|---|---|" + ("---|" if decoded else ""))
    for r in rows:
        print(f"| `{r['dataset']}` | {r['mean_photons']:.0f} | {r['rho_oracle']:.3f} | "
              f"{r['somers_oracle']:.3f} | {r['rho_ties']:.3f} | {r['map_correct']:.2f} |"
              + (f" {r['rho_truth_decoder']:.3f} ({r['truth_decoder_tilt_deg']:g}°) |"
                 if decoded else ""))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
