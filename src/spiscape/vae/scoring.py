"""The VAE scored against a simulator's truth (spiscape vae --truth, bench/vae.py,
bench/volume_curve.py): the latent against the melt parameter, the decoded pure states against
the true intensities, and the poses the VAE refined."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def refined_poses(quaternion, selected, delta, point_group: str) -> dict:
    """Refined quaternions (A, 4) of all averages: q * exp(delta) for those trained on (delta
    (n, 3), radians, in their order), the input elsewhere, in the point group's fundamental zone;
    and the angle each turned by (degrees, 0 elsewhere)."""
    from spiscape.orient import rotations

    quats = rotations.canonical(quaternion)
    delta_all = np.zeros((len(quats), 3))
    delta_all[np.flatnonzero(selected)] = delta
    refined = rotations.multiply(quats, rotations.from_rotvec(delta_all))
    group = rotations.point_group(point_group)
    return {"quaternion_refined": rotations.reduce(refined, group),
            "pose_change_deg": np.degrees(np.linalg.norm(delta_all, axis=1))}


def average_truth_t(averages_path, replicate_paths, inputs, truth):
    """(true t, true label majority, label fractions (A, 3+): cube, melting, sphere, ..., from
    frames) per average: from averages.h5's truth keys (synthetic averages: from frames False)
    or from the replicates' occupancies of the truth's frames (from frames True)."""
    from spiscape.io.averages import read_average_truth

    known = read_average_truth(averages_path)
    if known is not None:
        t, lab = known
        onehot = (lab[:, None] == np.arange(max(int(lab.max()) + 1, 3))).astype(float)
        return t, lab, onehot, False
    if not replicate_paths:
        return None
    from spiscape.embed.landscape import average_truth
    from spiscape.io.replicate import read_replicates

    res = average_truth(inputs.intens.shape[0], read_replicates(replicate_paths),
                        inputs.replicate, inputs.klass, truth.label, truth.t,
                        len(truth.label_names) or 5)
    frac = res["fractions"]
    return res["mean_t"], frac.argmax(1), frac, True


def pure_averages(fraction, threshold: float = 0.8, fallback: int = 3):
    """The averages that stand for one pure state (the cube, the sphere): those whose frames are
    >= ``threshold`` of it (by occupancy); if there are none, the ``fallback`` most alike. Their
    mean latent is the state's latent. Returns (mask, rule in words)."""
    frac = np.nan_to_num(np.asarray(fraction, dtype=float), nan=0.0)
    mask = frac >= threshold
    if mask.any():
        return mask, f"fraction >= {threshold}"
    mask = np.zeros(frac.size, dtype=bool)
    if frac.max(initial=0.0) > 0:
        mask[np.argsort(-frac)[:fallback]] = True
    return mask, f"the {fallback} most alike averages (none >= {threshold})"


def truth_reference(truth, label: int, from_frames: bool, size: int, step: float = 1.0):
    """The truth's intensity of a pure state (first volume with that ``label``) as the data show
    it: averaged over the sizes of that label's frames (no spread for synthetic averages of the
    nominal volumes), on the VAE's size^3 grid (q step ``step`` detector pixels: cropped, or
    resampled). Returns (volume index, sizes, reference)."""
    from spiscape.metrics.volumes import on_grid, size_averaged

    k = int(np.flatnonzero(np.asarray(truth.volume_info["label"]) == label)[0])
    sizes = np.ones(1)
    if from_frames and "size" in truth.frames:
        sizes = np.asarray(truth.size)[np.asarray(truth.label) == label]
    return k, sizes, on_grid(size_averaged(truth.volumes[k], sizes), size, step)


def size_scales(volume_at, truth, cube_volume, cube_reference, sphere, mu, from_frames,
                qmin, qmax, step: float = 1.0) -> dict:
    """Sizes of the decoded cube and sphere read from their fringes (no phasing): the scale s
    of the truth (averaged over the data's sizes) that the decoded volume matches best, and the
    sphere / cube volume ratio they imply relative to the truth's, (s_sphere / s_cube)^3 - 1.
    A check on the phased volume curve: a decoder can get the Porod volume right with fringes
    of the wrong size, or the reverse. ``volume_at(z)``: the run's volumes at latent points z."""
    from spiscape.metrics.volumes import best_size_scale

    out = {}
    cube = best_size_scale(cube_volume, cube_reference, qmin=qmin, qmax=qmax)
    out["cube_size_scale"] = cube["scale"]
    if not sphere.any() or not (np.asarray(truth.volume_info.get("label", [])) == 2).any():
        return out
    vol = volume_at(mu[sphere].mean(0, keepdims=True))[0]
    _, _, ref = truth_reference(truth, 2, from_frames, vol.shape[0], step)
    sph = best_size_scale(vol, ref, qmin=qmin, qmax=qmax)
    ratio = (sph["scale"] / cube["scale"]) ** 3 - 1.0
    edge = [name for name, fit in (("cube", cube), ("sphere", sph)) if fit["at_edge"]]
    if edge:  # no optimum inside the grid: the size is unknown, not the grid's end
        log.warning("the decoded %s's size fit stopped at its grid's edge (no fringe optimum "
                    "in %.2f..%.2f): fringe_ratio_error is NaN", " and ".join(edge),
                    cube["scales"][0], cube["scales"][-1])
        ratio = float("nan")
    out.update(sphere_size_scale=sph["scale"], fringe_ratio_error=ratio,
               fringe_fit_at_edge=edge)
    return out


def score_against_truth(averages_path, replicate_paths, inputs, truth, mu, model, weight, qnorm,
                        ctx, out, figures: bool = True, step: float = 1.0,
                        volume_at=None) -> dict:
    """The VAE against the simulator's truth: Spearman of the first latent with the melt
    parameter t over the averages, the cube's shell correlation with the truth (nominal and
    averaged over the data's sizes), sizes read from the fringes; figures into ``out``.

    ``volume_at(z)``: the run's volumes (K, V, V, V) at latent points z (K, zdim), the ones it
    writes to volumes.h5 (the decoder's by default; those refined from the frames, spiscape vae
    --frame-refine). Where they are not the decoder's, the decoder's own cube shell correlation is
    ``decoder_cube_shell_cc_min``."""
    from functools import partial

    from spiscape.metrics.volumes import best_rotation_shell_correlation, on_grid
    from spiscape.vae import analysis

    scores = {}
    got = average_truth_t(averages_path, replicate_paths, inputs, truth)
    if got is None:
        log.warning("--truth without replicates or truth keys in averages.h5: no latent score")
        return scores
    t, label, fractions, from_frames = got
    ok = np.isfinite(t) & (label <= 2)
    rho = analysis.spearman(mu[ok, 0], t[ok])
    scores["spearman_mu0_t"] = rho
    scores["spearman_averages"] = int(ok.sum())
    scores["_average_t"] = np.where(ok, t, np.nan)
    sphere, sphere_rule = pure_averages(fractions[:, 2])
    if sphere.any():
        # where the sphere sits on the latent: the volume curve is read there (bench/vae.py)
        scores.update(sphere_latent=mu[sphere].mean(0).tolist(), sphere_averages=int(sphere.sum()),
                      sphere_rule=sphere_rule)
    cube, cube_rule = pure_averages(fractions[:, 0])
    has_cube = (np.asarray(truth.volume_info.get("label", [])) == 0).any()
    if cube.any() and truth.volumes is not None and has_cube:
        zc = mu[cube].mean(0, keepdims=True)
        decoder = partial(analysis.decode_volumes, model, device=ctx.device)
        vol = (volume_at or decoder)(zc)[0]
        # the data's cubes have a size spread (truth `size` of the cube frames): their mean
        # intensity has blurred fringe minima, which is what a perfect reconstruction gives
        k, sizes, spread_ref = truth_reference(truth, 0, from_frames, vol.shape[0], step)
        nominal_ref = on_grid(truth.volumes[k], vol.shape[0], step)
        # only the measured |q| range is scored: inside the beamstop (and beyond the detector)
        # the volume is the decoder's extrapolation, constrained by no data
        qmax = float(qnorm[weight].max())
        qmin = float(qnorm[weight].min())
        nominal = best_rotation_shell_correlation(vol, nominal_ref, fraction=0.7, qmax=qmax,
                                                  qmin=qmin)
        res = best_rotation_shell_correlation(vol, spread_ref, fraction=0.7, qmax=qmax,
                                              qmin=qmin)
        inner = res["q"] <= res["fraction"] * qmax
        scores.update(cube_nominal_shell_cc_min=nominal["min"],
                      cube_nominal_shell_cc=[None if not np.isfinite(c) else float(c)
                                             for c in nominal["cc"][inner]],
                      cube_size_spread=float(np.std(sizes)),
                      cube_shell_reference=f"truth volumes/intens[{k}] averaged over the "
                                           "sizes of the cube frames",
                      cube_shell_cc_min=res["min"], cube_shell_cc_mean=res["mean"],
                      cube_shell_qmin=qmin, cube_shell_qmax=qmax, cube_averages=int(cube.sum()),
                      cube_rule=cube_rule, cube_latent=zc[0].tolist(),
                      cube_shell_q=[float(v) for v in res["q"][inner]],
                      cube_shell_cc=[None if not np.isfinite(c) else float(c)
                                     for c in res["cc"][inner]])
        if volume_at is not None:
            scores["decoder_cube_shell_cc_min"] = best_rotation_shell_correlation(
                decoder(zc)[0], spread_ref, fraction=0.7, qmax=qmax, qmin=qmin)["min"]
        scores.update(size_scales(volume_at or decoder, truth, vol, spread_ref, sphere, mu,
                                  from_frames, qmin, qmax, step))
        if figures:
            from spiscape.vae import figures as vae_figures

            vae_figures.shell_cc(out / "cube_shell_cc.png", res["q"], res["cc"], qmax, 0.7)
            vae_figures.latent_vs_truth(out / "latent_vs_t.png", mu[ok, 0], t[ok], rho)
    return scores
