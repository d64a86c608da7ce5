"""Phase retrieval of 3D volumes or 2D averages (DM, RAAR, HIO, ER with shrink-wrap) and particle volumes.

3D (``--volumes vae/volumes.h5``: ``z (K, zdim)``, ``intens (K, V, V, V)``, attribute
``q_per_voxel_inv_nm``; NaN marks unmeasured voxels) writes ``phasing.h5`` with ``density
(K, V, V, V)`` (aligned average of the random starts, centred, non-negative), ``support`` (the
shrink-wrap support), ``volume (K,)`` in nm^3, ``prtf (K, n_shells)``, ``prtf_q (n_shells,)`` in
1/nm, ``resolution_nm (K,)`` (PRTF = 1/e), ``z``; and the volume-versus-latent curve
``volume_curve.csv``. 2D (``--averages averages.h5``: ``intens (A, S, S)``, ``support (S, S)`` the
measured pixels) writes projected densities ``density (A, S, S)`` and their areas.

Unmeasured Fourier voxels (NaN, outside --q-max, inside --q-min, outside the 2D support) are left
free; for 3D the limits default to the input's ``q_min_measured`` / ``q_max_measured`` attributes
(voxels; the VAE decoder extrapolates beyond them). The particle volume rule is described in :mod:`spiscape.phasing.volume`.

``--method`` (3D): ``iterative`` phases random starts (the recipe, --starts, agreement rounds);
``nn`` takes the neural phaser's prediction as the density; ``nn+refine`` refines that prediction
with --refine-recipe and falls back to random starts where the refinement departs from it
(:mod:`spiscape.phasing.neural`); ``auto`` is ``nn+refine`` when a model is available (the
shipped one or --phaser-model) and the measured q range is within the one it was trained on (a
beamstop up to 5 voxels for the shipped model), ``iterative`` otherwise, and always
``iterative`` for 2D.
``phasing.h5`` records each pattern's ``method``.
"""

# ruff: noqa: E501 (the docstring's first line is the CLI summary, kept on one line)
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from spiscape.backend import get_array_module
from spiscape.errors import InputError
from spiscape.io.averages import read_averages
from spiscape.io.maps import write_maps
from spiscape.io.phasing import write_curve, write_phasing
from spiscape.io.volumes import read_volumes
from spiscape.phasing import (
    PhasingParams,
    measured_shell_mask,
    parse_recipe,
    phase_pattern,
    reproduced,
)
from spiscape.phasing.algorithms import (
    DEFAULT_RECIPE,
    STAGNATION_RETRIES,
    final_error,
    independent_params,
    retry_params,
    retry_replaces,
    stagnated,
)
from spiscape.phasing.neural import (
    METHODS,
    REFINE_RECIPE,
    NeuralSettings,
    load_phaser,
    outside_training,
    phase_volume,
    shipped_model_path,
)
from spiscape.phasing.volume import (
    DEFAULT_RULE,
    DEFAULT_SMOOTHING,
    RULES,
    particle_volume_nm3,
    shared_envelope,
    voxel_size_nm,
)
from spiscape.utils.args import at_least, number_in

log = logging.getLogger(__name__)

#: --method's default (``auto``: the neural phaser refined, where a model exists)
DEFAULT_METHOD = "auto"

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out": "file", "curve": "file", "figure_dir": "folder", "mrc_dir": "folder"}

#: shown under "Example" in ``spiscape phase -h``
EXAMPLE = """\
spiscape phase --volumes vae/volumes.h5 --out phasing.h5 --curve volume_curve.csv \\
    --mrc-dir maps/
"""


def add_args(parser):
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--volumes", help="3D intensities along the latent space (vae/volumes.h5)")
    src.add_argument("--averages", help="2D class averages (averages.h5)")
    parser.add_argument("--out", required=True, help="output phasing.h5")
    parser.add_argument("--curve", default=None, help="output volume_curve.csv (3D)")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE,
                        help="iterations and algorithms in order, e.g. '100 DM 50 ER' "
                        "(DM, RAAR, HIO, ER)")
    parser.add_argument("--starts", type=at_least(1), default=8,
                        help="random starts per pattern, aligned and averaged")
    parser.add_argument("--seed", type=at_least(0), default=1, help="seed of the random starts")
    parser.add_argument("--min-agree", type=at_least(1), default=2,
                        help="starts (the best included) whose aligned densities must agree "
                        "(CC >= --agree-cc) before a result is trusted; fewer and another batch "
                        "of --starts is phased (1: no check)")
    parser.add_argument("--agree-cc", type=number_in(-1, 1), default=0.8,
                        help="aligned density CC with the best start that counts as agreeing")
    parser.add_argument("--max-rounds", type=at_least(1), default=3,
                        help="most batches of --starts phased per pattern")
    parser.add_argument("--beta", type=float, default=0.9, help="HIO / RAAR feedback parameter")
    parser.add_argument("--shrinkwrap-every", type=at_least(1), default=20,
                        help="iterations between support updates (0: fixed support)")
    parser.add_argument("--shrinkwrap-threshold", type=float, default=0.15,
                        help="support = blurred density above this fraction of its maximum at the last "
                        "update (falling linearly from 0.3 at the first)")
    parser.add_argument("--volume-rule", choices=RULES, default=None,
                        help="how the particle volume is measured (see spiscape.phasing.volume); "
                        f"default porod for 3D volumes, {DEFAULT_RULE} for 2D averages")
    parser.add_argument("--threshold-fraction", type=float, default=None,
                        help="threshold as a fraction of the plateau (plateau) or "
                        "maximum (max) density; default 0.5")
    parser.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING,
                        help="Gaussian sigma (voxels) of the low-pass whose maximum is the plateau "
                        "density (volume rule 'integrated')")
    parser.add_argument("--mass-fraction", type=float, default=0.9,
                        help="fraction of the total mass enclosed (volume rule 'mass' only)")
    parser.add_argument("--q-per-voxel", type=float, default=None,
                        help="q step in 1/nm (default: the input's q_per_voxel_inv_nm attribute)")
    parser.add_argument("--q-min", type=float, default=None,
                        help="treat |q| below this (voxels) as unmeasured (beamstop); default: the "
                        "input's q_min_measured attribute (VAE volumes), else 0")
    parser.add_argument("--q-max", type=float, default=None,
                        help="treat |q| above this (voxels) as unmeasured (detector edge); default: "
                        "the input's q_max_measured attribute (VAE volumes), else none")
    parser.add_argument("--indices", type=int, nargs="+", default=None,
                        help="phase only these volumes / averages")
    parser.add_argument("--figure-dir", default=None, help="directory for the figures")
    parser.add_argument("--mrc-dir", default=None,
                        help="also write each 3D density as density_NNN.mrc (voxel size in A, "
                             "centre at the origin) with z_values.txt, for ChimeraX")
    parser.add_argument("--method", choices=("auto",) + METHODS, default=DEFAULT_METHOD,
                        help="iterative (random starts), nn (the network's prediction), "
                        "nn+refine (prediction refined; random starts where they disagree), "
                        "auto (nn+refine for 3D when a model exists)")
    parser.add_argument("--phaser-model", default=None,
                        help="neural phaser weights (spiscape train-phaser); default: the "
                        "shipped model")
    parser.add_argument("--refine-recipe", default=REFINE_RECIPE,
                        help="recipe refining the network's prediction (nn+refine)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="array device (CuPy on a GPU when available)")


def _params(args) -> PhasingParams:
    parse_recipe(args.recipe)
    return PhasingParams(recipe=args.recipe, starts=args.starts, seed=args.seed, beta=args.beta,
                         shrinkwrap_every=args.shrinkwrap_every,
                         shrinkwrap_threshold=args.shrinkwrap_threshold,
                         min_agree=args.min_agree, agree_cc=args.agree_cc,
                         max_rounds=args.max_rounds)


def averages_to_phase(path, q_per_voxel=None, indices=None):
    """averages.h5 for 2D phasing: intens (float32), support, q step (None: not in the file)."""
    data = read_averages(path)
    intens = data.intens.astype(np.float32)
    if intens.shape[-1] % 2 == 0:
        raise InputError(path, f"S = {intens.shape[-1]} is even: the beam centre (S-1)/2 is not "
                         "a pixel, phasing needs an odd grid")
    idx = list(range(intens.shape[0])) if indices is None else list(indices)
    if any(i < 0 or i >= intens.shape[0] for i in idx):
        raise InputError(path, f"indices {idx} out of range 0..{intens.shape[0] - 1}")
    return intens[idx], data.support, (float(q_per_voxel) if q_per_voxel else None), idx


def choose_method(args, q_min: float = 0.0, q_max: float = float("inf"), n: int = 0):
    """(method, loaded phaser or None) for this run (see the module docstring): ``auto`` phases
    with random starts where the data are outside the neural phaser's training range."""
    method = args.method
    if not args.volumes:
        if method not in ("auto", "iterative"):
            raise InputError("--method", f"{method} phases 3D volumes only; 2D averages are "
                             "phased with --method iterative")
        return "iterative", None
    if method == "iterative" or (method == "auto" and args.phaser_model is None
                                 and shipped_model_path() is None):
        return "iterative", None
    phaser = load_phaser(args.phaser_model)
    why = outside_training(phaser, q_min, q_max, n)
    if why and method == "auto":
        log.info("phasing with random starts: %s", why)
        return "iterative", None
    if why:
        log.warning("%s; its prediction may be poor (the refinement and the fallback to random "
                    "starts still apply)", why)
    method = "nn+refine" if method == "auto" else method
    log.info("phasing with %s: neural phaser %s (sha256 %s)", method, phaser.path,
             phaser.sha256[:12])
    return method, phaser


def main(args):
    params = _params(args)
    parse_recipe(args.refine_recipe)
    xp = get_array_module(args.device)
    neural = NeuralSettings(refine_recipe=args.refine_recipe, agree_cc=args.agree_cc,
                            device="cuda" if xp is not np else "cpu")
    q_min = 0.0 if args.q_min is None else args.q_min
    q_max = float("inf") if args.q_max is None else args.q_max
    if args.volumes:
        stored = read_volumes(args.volumes, args.indices)
        z, intens, idx, has_data = stored.z, stored.intens, stored.indices, stored.has_data
        dq = args.q_per_voxel or stored.q_per_voxel
        if dq is None:
            raise InputError(args.volumes, "no q_per_voxel_inv_nm attribute; pass --q-per-voxel")
        dq = float(dq)
        extra = None
        file_min, file_max = stored.q_min_measured, stored.q_max_measured
        if args.q_min is None and file_min is not None:
            q_min = file_min
        if args.q_max is None and file_max is not None:
            q_max = file_max
        log.info("unmeasured: |q| < %.3g or |q| > %.3g voxels", q_min, q_max)
    else:
        intens, extra, dq, idx = averages_to_phase(args.averages, args.q_per_voxel,
                                                   args.indices)
        z = np.asarray(idx, dtype=np.float64)[:, None]
        has_data = np.ones(len(idx), dtype=bool)
    shape = intens.shape[1:]
    method, phaser = choose_method(args, q_min, q_max, shape[0])
    measured = measured_shell_mask(shape, q_min, q_max)
    if extra is not None:
        measured &= extra
    rule = args.volume_rule or ("porod" if args.volumes else DEFAULT_RULE)
    fraction = args.mass_fraction if rule == "mass" else args.threshold_fraction
    results, volumes, seconds, methods = [], [], [], []
    # one Porod envelope for the whole curve: the blur is common to its volumes, one volume's
    # own estimate also reads its shape (spiscape.phasing.volume)
    envelope_s2 = shared_envelope(intens, measured) if rule == "porod" else None
    if envelope_s2 is not None:
        log.info("Porod envelope exp(-s^2 q^2) shared by the %d volumes: s^2 %.3g voxels^-2",
                 intens.shape[0], envelope_s2)

    def volume_of(res, k):
        return (particle_volume_nm3(res.signed_density, dq, rule, fraction, args.smoothing,
                                    intens=intens[k], measured=measured,
                                    envelope_s2=envelope_s2) if dq else float("nan"))

    for k in range(intens.shape[0]):
        start = time.perf_counter()
        res, used = phase_volume(intens[k], method, phaser, params, neural, xp=xp,
                                 measured=measured)
        seconds.append(time.perf_counter() - start)
        results.append(res)
        methods.append(used)
        volumes.append(volume_of(res, k))
        log.info("pattern %d/%d: %s, %.1f s, %d of %d starts averaged%s, support error %.2g, "
                 "volume %.4g, PRTF 1/e at shell %s", k + 1, intens.shape[0], used, seconds[-1],
                 res.kept.size, res.errors.shape[1],
                 "" if res.converged else " (NOT CONVERGED: no two starts agree)",
                 final_error(res), volumes[-1], res.resolution_q)
    outliers = stagnated(results)
    # the volume the curve's sound patterns agree on: a re-phased pattern must land within a
    # factor 2 of it and nearer to it than its first result (retry_replaces)
    sound = [volumes[k] for k in range(len(results)) if k not in outliers]
    typical = float(np.median(sound)) if sound else float("nan")
    for k in outliers:
        # every start of a batch can stagnate alike (they agree with each other, so the
        # agreement rule passes) in a solution whose support error is several times that of the
        # curve's other patterns and whose F(0) is far too small
        phasings = [results[k]]
        for attempt in range(1, STAGNATION_RETRIES + 1):
            retry = phase_pattern(intens[k], retry_params(params, attempt), xp=xp,
                                  measured=measured)
            volume = volume_of(retry, k)
            phasings.append(retry)
            if retry_replaces(final_error(results[k]), volumes[k], final_error(retry), volume,
                              typical):
                results[k], volumes[k], methods[k] = retry, volume, "iterative"
            if k not in stagnated(results):
                break
        still = k in stagnated(results)
        cc = None
        if still:
            # an outlier error that an independent phasing (the run's settings, other seeds)
            # reproduces is the intensities' own, not a stagnation
            phasings.append(phase_pattern(intens[k], independent_params(params), xp=xp,
                                          measured=measured))
            cc = reproduced(results[k], phasings, volumes[k], typical, params.agree_cc, xp=xp)
        if still and cc is None:
            results[k] = replace(results[k], converged=False)
        outcome = ("" if not still else
                   " (still an outlier, and a phasing at the run's settings with other seeds "
                   "lands elsewhere: NOT CONVERGED)" if cc is None else
                   f" (still an outlier, but a phasing at the run's settings with other seeds "
                   f"lands on the same density, aligned CC {cc:.2f}: kept as converged; the "
                   f"intensities there are not one object's)")
        log.warning("pattern %d/%d: support error an outlier of the curve's; phased again "
                    "(other seeds, lower shrink-wrap threshold): "
                    "error %.2g, volume %.4g%s", k + 1, intens.shape[0], final_error(results[k]),
                    volumes[k], outcome)
    voxel = voxel_size_nm(shape[-1], dq) if dq else float("nan")
    n_shells = max(r.prtf.size for r in results)
    prtf = np.full((len(results), n_shells), np.nan)
    for k, r in enumerate(results):
        prtf[k, : r.prtf.size] = r.prtf
    prtf_q = np.arange(n_shells) * (dq if dq else 1.0)
    resolution = np.array([1.0 / (r.resolution_q * dq) if dq and np.isfinite(r.resolution_q)
                           and r.resolution_q > 0 else np.nan for r in results])
    volumes = np.asarray(volumes)
    attrs = {
        "recipe": args.recipe, "starts": args.starts, "seed": args.seed,
        "method": method, "refine_recipe": args.refine_recipe,
        "phaser_model": phaser.path if phaser else "", "phaser_sha256": phaser.sha256 if phaser
        else "",
        "volume_rule": rule,
        "threshold_fraction": -1.0 if fraction is None else float(fraction),
        "voxel_size_nm": voxel, "q_per_voxel_inv_nm": dq if dq else np.nan,
        "porod_envelope_s2": np.nan if envelope_s2 is None else envelope_s2,
        "q_min_voxels": q_min, "q_max_voxels": q_max, "smoothing_voxels": args.smoothing,
        "mode": "3d" if args.volumes else "2d",
        "source": str(args.volumes or args.averages),
        "params": json.dumps(params.__dict__),
        "seconds_per_pattern": float(np.mean(seconds)),
    }
    if args.figure_dir:
        _figures(Path(args.figure_dir), results, z, volumes, prtf, prtf_q, bool(dq), has_data,
                 voxel)
    if args.mrc_dir and results and results[0].density.ndim == 3:
        write_maps(args.mrc_dir, [r.density for r in results], z, kind="density", voxel=voxel,
                   source=str(args.volumes or args.averages), indices=idx)
    if args.curve:
        write_curve(Path(args.curve), idx, z, volumes, resolution, has_data,
                    np.array([r.converged for r in results]))
    write_phasing(args.out, {
        "density": np.stack([r.density for r in results]),
        "support": np.stack([r.support for r in results]),
        "volume" if args.volumes else "area": volumes,
        "prtf": prtf, "prtf_q": prtf_q, "resolution_nm": resolution, "z": z,
        "index": np.asarray(idx),
        # mean support error of the averaged starts (a pattern phased in several rounds: of the
        # round's iterations, all rounds together)
        "error": _padded([r.errors[:, r.kept].mean(axis=1) for r in results]),
        "converged": np.array([r.converged for r in results]),
        "starts_averaged": np.array([r.kept.size for r in results]),
        "method": np.array(methods, dtype="S16"),
    }, attrs)
    log.info("%d patterns phased (%.1f s each) -> %s", len(results), np.mean(seconds), args.out)
    return 0


def _padded(rows) -> np.ndarray:
    """Rows of different lengths (methods run different recipes) as one array, NaN-padded."""
    out = np.full((len(rows), max(len(r) for r in rows)), np.nan)
    for k, r in enumerate(rows):
        out[k, : len(r)] = r
    return out


def _nice_length(value: float) -> float:
    """1, 2 or 5 times a power of ten, at most ``value``."""
    power = 10.0 ** np.floor(np.log10(value))
    return max(m * power for m in (1, 2, 5) if m * power <= value)


def _figures(directory, results, z, volumes, prtf, prtf_q, physical, has_data, voxel_nm=None):
    from spiscape.plotting import plt, save

    directory.mkdir(parents=True, exist_ok=True)
    n = len(results)
    shown = np.unique(np.linspace(0, n - 1, min(n, 8)).round().astype(int))
    ndim = results[0].density.ndim
    rows = 3 if ndim == 3 else 1
    fig, axes = plt.subplots(rows, len(shown), figsize=(1.8 * len(shown), 1.8 * rows),
                             squeeze=False)
    for col, k in enumerate(shown):
        d = results[k].density
        c = d.shape[0] // 2
        sections = [d[c], d[:, c], d[:, :, c]] if ndim == 3 else [d]
        for row, sec in enumerate(sections):
            ax = axes[row, col]
            ax.imshow(sec, cmap="gray_r", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, col].set_title(f"#{k} z0={z[k, 0]:.3g}", fontsize=7)
    if voxel_nm and np.isfinite(voxel_nm):  # a scale bar on the first section
        ax = axes[-1, 0]
        size = results[0].density.shape[-1]
        bar = _nice_length(0.25 * size * voxel_nm)
        ax.plot([0.05 * size, 0.05 * size + bar / voxel_nm], [0.06 * size] * 2, color="C3", lw=2)
        ax.text(0.05 * size, 0.1 * size, f"{bar:g} nm", color="C3", fontsize=6)
    if ndim == 3:
        for row, name in enumerate("xyz"):
            axes[row, 0].set_ylabel(f"{name} = 0", fontsize=7)
    save(fig, directory / "densities.png")

    fig, ax = plt.subplots(figsize=(4, 3))
    order = np.argsort(z[:, 0])
    ax.plot(z[order, 0], volumes[order], "-", color="C0", lw=1)
    ax.plot(z[has_data, 0], volumes[has_data], "o", color="C0", label="data nearby")
    if not has_data.all():
        ax.plot(z[~has_data, 0], volumes[~has_data], "o", mfc="none", color="C0",
                label="no data nearby")
        ax.legend(fontsize=7)
    ax.set_xlabel("latent z0")
    ax.set_ylabel("particle volume (nm³)" if ndim == 3 else "projected area (nm²)")
    save(fig, directory / "volume_vs_latent.png")

    fig, ax = plt.subplots(figsize=(4, 3))
    cmap = plt.get_cmap("viridis")
    for k in range(n):
        ax.plot(prtf_q, prtf[k], color=cmap(k / max(n - 1, 1)), lw=0.8)
    ax.axhline(1 / np.e, color="k", ls=":", lw=0.8, label="1/e (resolution)")
    if n > 1:  # one curve per volume along the latent: a colour bar, not 11 legend entries
        scale = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(z[:, 0].min(), z[:, 0].max()))
        fig.colorbar(scale, ax=ax, label="latent z0 of the volume")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_xlabel("q (1/nm)" if physical else "q (voxels)")
    ax.set_ylabel("PRTF")
    ax.set_ylim(0, 1.1)
    if np.all(np.isnan(prtf)):
        ax.set_title("one start per volume (neural phaser, refined): no PRTF", fontsize=7)
    elif np.all(np.nanmin(np.where(np.isnan(prtf), np.inf, prtf), axis=1) > 1 / np.e):
        ax.set_title("PRTF never falls below 1/e: resolution not limited by phasing\n"
                     "within the measured q (prtf_resolution_nm is NaN)", fontsize=7)
    save(fig, directory / "prtf.png")
