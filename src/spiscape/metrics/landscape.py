"""How well the per-frame landscape recovers the simulated populations and the melting parameter.

Two scores against ``truth.h5``:

* **populations**: the frames' clusters against the true populations cube, sphere and
  contaminant (dimer, rod and any label from 3 on, together), by the adjusted Rand index; also
  with every contaminant species a population of its own (``species_ari``). Melting frames are
  a continuum between cube and sphere with no right answer, so they are left out, as are frames
  never placed in the landscape.
* **sizes**: the per-frame size factor the VAE's posterior reads (:func:`size_spearman`)
  against the true one, by rank correlation within each of cube, melting and sphere.
* **melting order**: among non-contaminant frames (cube, melting, sphere) placed in the landscape,
  the Spearman rank correlation of each embedding component with the melting parameter ``t``; the
  best ``|rho|`` says whether some direction of the landscape orders the frames by structure.
"""

from __future__ import annotations

import numpy as np

# truth.h5 label numbers (spiscape.io.truth): 0 cube, 1 melting, 2 sphere, 3 dimer, 4 rod
CUBE, MELTING, SPHERE, DIMER, ROD = range(5)
POPULATIONS = ("cube", "sphere", "contaminant")


def populations(truth_label: np.ndarray, by_species: bool = False) -> np.ndarray:
    """0 cube, 1 sphere, 2 contaminant (every label from 3 on: dimer, rod, and the kinds of
    other simulators), -1 melting (or unknown). With ``by_species`` each contaminant label is a
    population of its own (2 + label - 3): a landscape that tells dimers from rods is not
    penalised for it."""
    label = np.asarray(truth_label)
    out = np.full(label.shape, -1, dtype=np.int64)
    out[label == CUBE] = 0
    out[label == SPHERE] = 1
    contaminant = label >= DIMER
    out[contaminant] = (label[contaminant] - DIMER + 2) if by_species else 2
    return out


def population_ari(cluster_label, truth_label, placed=None, by_species: bool = False) -> dict:
    """Adjusted Rand index of the frames' clusters against cube/sphere/contaminant (each
    contaminant species apart with ``by_species``).

    ``placed`` (bool, N) marks the frames in the landscape (default: cluster label >= 0).
    Also returns the contingency table (rows: populations; columns: clusters) for the report.
    """
    from sklearn.metrics import adjusted_rand_score

    cluster_label = np.asarray(cluster_label)
    pop = populations(truth_label, by_species)
    placed = cluster_label >= 0 if placed is None else np.asarray(placed, dtype=bool)
    use = placed & (pop >= 0)
    if not use.any():
        return {"ari": float("nan"), "frames": 0, "contingency": {}}
    ari = float(adjusted_rand_score(pop[use], cluster_label[use]))
    clusters = sorted(set(cluster_label[use].tolist()))
    names = (list(POPULATIONS) if not by_species else
             [*POPULATIONS[:2], *(f"contaminant{k}" for k in range(int(pop.max()) - 1))])
    table = {name: {str(c): int(np.sum((pop[use] == p) & (cluster_label[use] == c)))
                    for c in clusters} for p, name in enumerate(names)}
    return {"ari": ari, "frames": int(use.sum()), "contingency": table}


def series_frames(truth_label, t) -> np.ndarray:
    """(N,) bool: the frames whose order by t is scored, cube, melting and sphere with a t."""
    pop = populations(truth_label)
    return ((pop == 0) | (pop == 1) | (np.asarray(truth_label) == MELTING)) \
        & np.isfinite(np.asarray(t, dtype=np.float64))


def melting_spearman(coords, truth_label, t) -> dict:
    """Spearman rho of each embedding component with t over placed non-contaminant frames."""
    from scipy.stats import spearmanr

    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim == 1:
        coords = coords[:, None]
    t = np.asarray(t, dtype=np.float64)
    use = series_frames(truth_label, t) & np.all(np.isfinite(coords), axis=1)
    rhos = []
    for j in range(coords.shape[1]):
        if use.sum() > 2 and np.ptp(coords[use, j]) > 0 and np.ptp(t[use]) > 0:
            rhos.append(float(spearmanr(coords[use, j], t[use]).statistic))
        else:
            rhos.append(float("nan"))
    finite = [abs(r) for r in rhos if np.isfinite(r)]
    best = int(np.nanargmax(np.abs(rhos))) if finite else -1
    return {"best_abs_rho": max(finite) if finite else float("nan"),
            "best_component": best + 1 if best >= 0 else None,
            "rho": rhos, "frames": int(use.sum())}


def size_spearman(size, truth_label, truth_size) -> dict:
    """Spearman rho of each frame's estimated size factor (``frame_latent.h5``'s ``size``) with
    its true one (``truth.h5``'s ``size``) within the cube, the melting and the sphere frames
    that have an estimate (``None`` where fewer than 3 or no spread): the factors are relative to
    each shape's own size, so populations are scored apart; ``frames`` counts them."""
    from scipy.stats import spearmanr

    size = np.asarray(size, dtype=np.float64).reshape(-1)
    truth_size = np.asarray(truth_size, dtype=np.float64)
    label = np.asarray(truth_label)
    out: dict = {"frames": 0}
    for name, code in (("cube", CUBE), ("melting", MELTING), ("sphere", SPHERE)):
        use = (label == code) & np.isfinite(size) & np.isfinite(truth_size)
        out["frames"] += int(use.sum())
        ok = use.sum() > 2 and np.ptp(size[use]) > 0 and np.ptp(truth_size[use]) > 0
        out[name] = float(spearmanr(size[use], truth_size[use]).statistic) if ok else None
    return out


def score_landscape(coords, cluster_label, truth_label, t) -> dict:
    """Both scores, plus the share of frames placed in the landscape."""
    coords = np.asarray(coords, dtype=np.float64)
    placed = np.all(np.isfinite(coords), axis=1)
    return {
        "population_ari": population_ari(cluster_label, truth_label, placed),
        "species_ari": population_ari(cluster_label, truth_label, placed, by_species=True)["ari"],
        "melting_spearman": melting_spearman(coords, truth_label, t),
        "frames_placed": int(placed.sum()),
        "frames_total": int(placed.size),
    }
