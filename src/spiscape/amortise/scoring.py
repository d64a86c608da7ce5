"""The amortised model against a simulator's truth: per-frame orientation error modulo the point
group (after the one global rotation between the decoder's frame and the truth's), per-frame
Spearman of z with the melt parameter t, and the decoded cube's shell correlation."""

from __future__ import annotations

import numpy as np

from spiscape.orient import rotations


def global_alignment(pred: np.ndarray, truth: np.ndarray, group: np.ndarray,
                     candidates: int = 200, seed: int = 0) -> tuple[np.ndarray, float]:
    """The rotation A (quaternion) with truth_d ≈ g A pred_d (g in the group) for most frames:
    a decoder free to choose its axes shows I_true(A x). Candidates are the frames' own
    truth_d pred_d⁻¹, scored by the median misorientation, then refined on two local grids.
    Returns (A, its angle from the nearest group element, degrees)."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(pred), size=min(candidates, len(pred)), replace=False)
    tests = rng.choice(len(pred), size=min(400, len(pred)), replace=False)

    def median_error(a):
        return float(np.median(rotations.misorientation_deg(
            truth[tests], rotations.multiply(a[None], pred[tests]), group)))

    cands = rotations.multiply(truth[pick], rotations.conjugate(pred[pick]))
    cands = np.concatenate([rotations.point_group("1"), cands])
    scores = [median_error(a) for a in cands]
    best, top = cands[int(np.argmin(scores))], min(scores)
    for step in (2.0, 0.5):
        local = rotations.multiply(best[None], rotations.local_grid(step, 2 * step))
        values = [median_error(a) for a in local]
        if min(values) < top:
            best, top = local[int(np.argmin(values))], min(values)
    offset = float(rotations.misorientation_deg(best, rotations.point_group("1"), group)[0])
    return rotations.canonical(best[None])[0], offset


def orientation_errors(pred, truth, group_name: str = "m-3m", align: bool = True) -> dict:
    """Per-frame error (degrees) of predicted orientations modulo the point group, after the
    global alignment (``align``)."""
    group = rotations.point_group(group_name)
    pred, truth = np.atleast_2d(pred), np.atleast_2d(truth)
    a, offset = (global_alignment(pred, truth, group) if align
                 else (np.array([1.0, 0, 0, 0]), 0.0))
    aligned = rotations.multiply(a[None], pred)
    err = rotations.misorientation_deg(truth, aligned, group)
    # also modulo the Friedel twin R Rz(π), which a single frame tells apart only by the Ewald
    # sphere's curvature
    twin = rotations.misorientation_deg(truth, aligned, group, friedel=True)
    return {"error_deg": err, "alignment": a, "alignment_offset_deg": offset,
            "median_deg": float(np.median(err)),
            "within_5deg": float(np.mean(err <= 5.0)), "within_10deg": float(np.mean(err <= 10)),
            "twin_median_deg": float(np.median(twin)),
            "twin_within_5deg": float(np.mean(twin <= 5.0)),
            "twin_share": float(np.mean((twin <= 5.0) & (err > 5.0)))}


def score_against_truth(frames: dict, truth_path, model, qnorm: np.ndarray,
                        landscape: dict | None = None) -> dict:
    """Scores of an amortise.h5 (read) against truth.h5: cube frames' orientation error modulo
    m-3m (refined and the encoder's own), per-frame |Spearman(z, t)| over non-contaminant frames
    (the landscape's per-frame VAE latent beside it when given), and the shell correlation of the
    volume decoded at the cube frames' median z with the truth cube (averaged over the data's
    sizes) over the measured |q| range to 0.7 q_max."""
    import torch

    from spiscape.emc3d.slicing import rotate
    from spiscape.io.truth import read_truth
    from spiscape.metrics.landscape import melting_spearman
    from spiscape.metrics.volumes import best_rotation_shell_correlation
    from spiscape.vae.scoring import truth_reference

    truth = read_truth(truth_path)
    label, t = np.asarray(truth.label), np.asarray(truth.t)
    if len(label) != len(frames["z"]):
        from spiscape.errors import InputError

        raise InputError(truth_path, f"{len(label)} frames, amortise.h5 has {len(frames['z'])}")
    out: dict = {}
    for key, name in (("z", "rho_z"), ("z_encoder", "rho_z_encoder")):
        out[name] = melting_spearman(frames[key], label, t)["best_abs_rho"]
    if landscape is not None and landscape.get("latent") is not None \
            and np.isfinite(landscape["latent"]).any():
        out["rho_latent_2d_route"] = melting_spearman(landscape["latent"], label,
                                                      t)["best_abs_rho"]
    cube = label == 0
    if not cube.any():
        return out
    quats = np.asarray(truth.quaternion)
    fin = orientation_errors(frames["quaternion"][cube], quats[cube], model.point_group)
    enc = orientation_errors(frames["quaternion_encoder"][cube], quats[cube], model.point_group)
    out.update(cube_orientation_median_deg=fin["median_deg"],
               cube_orientation_within_5deg=fin["within_5deg"],
               cube_orientation_within_10deg=fin["within_10deg"],
               cube_orientation_twin_median_deg=fin["twin_median_deg"],
               cube_orientation_twin_within_5deg=fin["twin_within_5deg"],
               cube_friedel_twin_share=fin["twin_share"],
               cube_orientation_encoder_median_deg=enc["median_deg"],
               alignment_offset_deg=fin["alignment_offset_deg"])
    if truth.volumes is None or not (np.asarray(truth.volume_info["label"]) == 0).any():
        return out
    zc = np.median(frames["z"][cube], axis=0)
    with torch.no_grad():
        vol = model.volumes(torch.as_tensor(zc[None], dtype=torch.float32,
                                            device=model.q.device))[0].cpu().numpy()
    if fin["alignment_offset_deg"] > 1.0:  # I_model(x) = I_true(A x): turn it back by A⁻¹
        vol = rotate(vol, rotations.conjugate(fin["alignment"][None]))
    _, _, ref = truth_reference(truth, 0, True, vol.shape[0])
    res = best_rotation_shell_correlation(vol, ref, fraction=0.7, qmax=float(qnorm.max()),
                                          qmin=float(qnorm.min()))
    out.update(cube_shell_cc_min=res["min"], cube_shell_cc_mean=res["mean"],
               cube_latent=zc.tolist())
    return out
