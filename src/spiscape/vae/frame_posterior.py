"""Each frame's own latent: the posterior over z from its photons under the decoder.

The averages' latents hand every frame of a class the same z (:func:`spiscape.vae.analysis.
frame_latents`), so frames of different shapes that the 2D EMC put in one class cannot be told
apart: on the validation matrix that caps the per-frame |rho(z, t)| at 0.88-0.92 (README). Here
each frame is scored against the decoder itself. For frame d, a class c it may belong to (an
average the VAE trained on, with its orientation R_c and size offset d_c) and a latent point z_k
of a grid over the averages' latents, the decoder's volume is sliced at exp(d_c + s) R_c onto the
class grid (the model the 2D EMC would have had, :meth:`SPIVAE.forward`), expanded to the frame's
pixels at every in-plane angle r of the EMC (its bilinear view operator, :mod:`spiscape.emc.
kernels`) and normalised over the pixels, w_kr / sum w_kr. The frame's log-likelihood is the
multinomial one,

    log L_d(c, s, k, r) = sum_t k_dt log(w_ckrst / sum_t' w_ckrst'),

which is the Poisson likelihood with the frame's fluence at its maximum (the scale drops out).
The posterior over z_k is the sum over the in-plane angles r, the size steps s, the out-of-plane
tilts u and the candidate classes c, each with a flat prior:

    p(z_k | d) ∝ sum_c sum_s sum_u sum_r L_d(c, s, u, k, r),

and the frame's latent is its mean (with its standard deviation), averaged over the replicates
that drew the frame. Candidate classes are the trained classes holding at least 1e-3 of the
frame's largest occupancy among them, so the EMC's orientation choice is kept but not forced:
a frame between two classes is scored against both. The size steps, ``sizes`` (log scale, default
-8 % ... +8 % in 9 steps of 2 %), let a frame's own size differ from its class's: the matrix's size
spreads are 1-8 % per population, and a sphere's fringes at the wrong size read as another shape.

The tilts let a frame's orientation differ from its class's out of the detector plane. A 2D class
average merges frames from a patch of orientations about its own, not one: scored at the class's
orientation alone, a cube frame from the patch's edge fits a rounder volume better and reads as
melting (on three sets of the matrix the cube frames' latent followed how close their beam was
to a fourfold axis, Spearman 0.25-0.35). The tilts are the identity and a ring of
:data:`TILT_POINTS` rotations by an angle theta about axes in the detector plane. theta is the
data's choice (:func:`choose_tilt`): the angle among :data:`TILT_ANGLES` under which the frames'
photons are most probable, the mean over the frames of 8 trained classes drawn at random of

    log p(d | theta) = log mean_{k, s, u} sum_c sum_r L_d(c, s, u, k, r)

(the marginal likelihood of the patch's width, up to terms theta does not change; 0 keeps the
class's orientation only).

Cost: per replicate, per trained average, (#sizes x #tilts x K) slices and one sparse (frames x
pixels) by dense (pixels x K R) product per size and tilt over the frames that may belong to it.
Frames are read ``block`` at a time, so memory stays at one block's photons plus one average's
views. The tilts multiply the cost by 5 (the ring of 4 and the identity), and :func:`choose_tilt`
scores the frames of 8 classes at up to five angles first.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from spiscape.backend import to_numpy
from spiscape.emc import geometry, kernels
from spiscape.errors import InputError

log = logging.getLogger(__name__)


def size_steps(size_range: float, steps: int = 9) -> np.ndarray:
    """Log size steps from 1 - r to 1 + r times a class's size (just 0 for r = 0)."""
    if size_range <= 0:
        return np.zeros(1)
    return np.log(1.0 + np.linspace(-size_range, size_range, steps))


#: default log size steps around each class's size (see the module docstring)
SIZES = tuple(size_steps(0.08))
#: a trained class is a candidate of a frame holding at least this share of its largest
#: occupancy among the trained classes
CANDIDATE_SHARE = 1e-3
#: out-of-plane tilts about a class's orientation besides the identity (a ring): on
#: ``sim72lowphot`` at 8 degrees a ring of 4 gained rho 0.900 -> 0.910 and one of 8 0.912, at
#: 5 and 9 times the cost of no tilt
TILT_POINTS = 4
#: spacing (degrees) of the orientation grid of :func:`global_latents`
GLOBAL_STEP = 8.0
#: bytes of log views :func:`global_latents` holds at a time (orientations are taken in chunks)
VIEW_BYTES = 512 * 2**20
#: the tilt angles (degrees) :func:`choose_tilt` chooses from
TILT_ANGLES = (0.0, 4.0, 8.0, 12.0, 16.0, 20.0, 24.0)
#: trained classes whose frames :func:`choose_tilt` scores each angle on (:func:`tilt_sample`)
TILT_CLASSES = 8


def tilt_rotations(angle_deg: float, num: int = TILT_POINTS) -> np.ndarray:
    """(T, 3, 3): the identity and ``num`` rotations by ``angle_deg`` about axes in the detector
    plane (first two grid axes) evenly spaced in direction (:func:`spiscape.vae.model.tilt_ring`);
    the identity alone for 0."""
    from spiscape.vae.model import tilt_ring

    if angle_deg <= 0:
        return np.eye(3)[None]
    return tilt_ring(torch.tensor(np.deg2rad(angle_deg), dtype=torch.float64), num).numpy()


@dataclass
class Classes:
    """The averages the VAE trained on: where they came from and how the decoder sees them."""

    replicate: np.ndarray  # (C,) replicate number
    klass: np.ndarray  # (C,) class within it
    quaternion: np.ndarray  # (C, 4) orientation (refined when the VAE refined it)
    log_scale: np.ndarray  # (C,) size against the decoded volume's (0 without size correction)


def latent_grid(mu: np.ndarray, num: int, margin: float = 0.1) -> np.ndarray:
    """K points (K, zdim) over the trained averages' latents, as the volumes along the latent are
    placed (:func:`spiscape.vae.analysis.latent_points`), widened by ``margin`` of the span about
    its centre: a frame may lie beyond the most extreme average."""
    from spiscape.vae.analysis import latent_points

    z, _ = latent_points(mu, num)
    centre = 0.5 * (z.min(0) + z.max(0))
    return centre + (1.0 + margin) * (z - centre)


def volumes_along(z_grid: np.ndarray, vols: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Volumes (len(z), ...) at latent points ``z``, linear between those ``vols`` (K, ...) at the
    points of :func:`latent_grid` ``z_grid`` (K, zdim): along its line (zdim 1, and zdim >= 3,
    whose grid is a line along the latents' first principal axis) or bilinear on its n x n grid
    (zdim 2). Points beyond the grid take its edge."""
    from scipy.interpolate import RegularGridInterpolator

    z_grid = np.asarray(z_grid, dtype=np.float64)
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    vols = np.asarray(vols)
    k = z_grid.shape[0]
    if z_grid.shape[1] == 2:
        n = int(round(np.sqrt(k)))
        if n * n != k:
            raise ValueError(f"a zdim-2 latent grid has n x n points, not {k}")
        square = z_grid.reshape(n, n, 2)
        axes = (square[:, 0, 0], square[0, :, 1])
        values = vols.reshape(n, n, -1)
        coords = z
    else:
        span = z_grid[-1] - z_grid[0]
        axes = (np.arange(k, dtype=np.float64),)
        values = vols.reshape(k, -1)
        coords = ((z - z_grid[0]) @ span / max(float(span @ span), 1e-300) * (k - 1))[:, None]
    coords = np.stack([np.clip(coords[:, i], a.min(), a.max()) for i, a in enumerate(axes)], 1)
    out = RegularGridInterpolator(axes, values)(coords)
    return out.reshape(z.shape[0], *vols.shape[1:]).astype(vols.dtype)


def log_views(models, operator, num_rot: int, xp=np):
    """log(w / sum_t w) (M, R, P) of the models (M, S^2) at every in-plane angle: each view
    normalised over the pixels, floored at 1e-6 of its model's brightest view pixel (a slice
    reads 0 where the volume is 0; a photon there would otherwise be impossible)."""
    views = kernels.expand(models, operator, num_rot)
    floor = 1e-6 * views.reshape(views.shape[0], -1).max(axis=1)
    return log_normalised(views, floor[:, None, None], xp)


def log_normalised(views, floor, xp=np):
    """log(w / sum_t w) over the last (pixel) axis of ``views``, each floored at ``floor``
    (broadcast against them; at least the smallest normal number of their precision)."""
    views = xp.maximum(views, xp.maximum(floor, xp.finfo(views.dtype).tiny))
    return xp.log(views) - xp.log(views.sum(axis=-1, keepdims=True))


def frame_log_likelihood(counts, logv, xp=np):
    """log sum_r L (n, M): the multinomial log-likelihood of each frame's counts (n, P) (sparse
    on the array module) under every model's views ``logv`` (M, R, P), summed over the angles."""
    num_models, num_rot, num_pix = logv.shape
    ll = kernels.product(counts, logv.reshape(num_models * num_rot, num_pix).T, xp)
    ll = ll.reshape(-1, num_models, num_rot)
    top = ll.max(axis=2)
    return top + xp.log(xp.exp(ll - top[:, :, None]).sum(axis=2))


def frame_log_likelihood_reference(counts: np.ndarray, logv: np.ndarray) -> np.ndarray:
    """NumPy reference of :func:`frame_log_likelihood` on dense counts, one frame at a time."""
    from scipy.special import logsumexp

    out = np.empty((counts.shape[0], logv.shape[0]))
    for i, row in enumerate(np.asarray(counts, dtype=np.float64)):
        out[i] = logsumexp((logv * row[None, None, :]).sum(axis=2), axis=1)
    return out


def candidates(occupancies: np.ndarray, trained: np.ndarray,
               share: float = CANDIDATE_SHARE) -> np.ndarray:
    """(n, M) bool: trained classes holding at least ``share`` of each frame's largest occupancy
    among the trained ones (none for a frame with no occupancy on them)."""
    occ = np.where(np.asarray(trained, dtype=bool)[None, :], occupancies, 0.0)
    top = occ.max(axis=1, keepdims=True)
    return (occ >= share * top) & (top > 0)


def class_models(model, vols: torch.Tensor, quaternion: np.ndarray, log_scale: float,
                 size_step: float, tilt=None) -> np.ndarray:
    """The decoder's slices (K, S^2) at one class's orientation and size times exp(size_step),
    tilted by the rotation ``tilt`` (3, 3) of the slice (default none): the volumes ``vols``
    (K, ...) are the decoder's symmetric output at the latent grid."""
    from spiscape.vae.model import quaternion_to_matrix, slice_volumes

    rot = quaternion_to_matrix(torch.as_tensor(np.asarray(quaternion)[None],
                                               dtype=torch.float32))[0]
    rot = rot * float(np.exp(log_scale + size_step))
    if tilt is not None:
        rot = rot @ torch.as_tensor(np.asarray(tilt), dtype=rot.dtype)
    with torch.no_grad():
        out = slice_volumes(vols, model.q.float(), rot.expand(vols.shape[0], 3, 3).to(vols.device),
                            folded=model.octant)
    return out.cpu().numpy().astype(np.float64)


def used_pixels(det, model_pixels: np.ndarray, q_min: float, q_max: float) -> np.ndarray:
    """The merged pixels the likelihood uses: mask 0 and q_min <= |q| <= q_max (pixels)."""
    from spiscape.simulate.detector import q_magnitude

    qnorm = q_magnitude(det)[model_pixels]
    keep = (np.asarray(det.mask)[model_pixels] == 0) & (qnorm >= q_min) & (qnorm <= q_max)
    if not keep.any():
        raise InputError(None, f"no used detector pixel between |q| {q_min:.1f} and {q_max:.1f} "
                               "pixels for the per-frame latents")
    return np.asarray(model_pixels)[keep]


def posterior_latents(model, det, replicates, photons, classes: Classes, z: np.ndarray,
                      num_frames: int, q_min: float = 0.0, q_step: float = 1.0,
                      sizes=SIZES, tilts=None, subset=None, xp=np, block: int = 32768,
                      device="cpu") -> dict:
    """Each frame's posterior mean latent ``latent`` (N, zdim) and standard deviation ``sd``
    (N, zdim) over the grid ``z`` (K, zdim), averaged over the replicates (paths) that drew it;
    NaN for frames with no candidate class. ``photons``: the dataset's photon files; ``q_min``,
    ``q_step`` in detector pixels (the VAE's loss cut and voxel size); ``model`` a trained
    :class:`spiscape.vae.model.SPIVAE`; ``tilts`` (T, 3, 3) the out-of-plane tilts summed over
    (:func:`tilt_rotations`; default the identity); ``subset`` (N,) bool: score only these
    frames. ``evidence``: the mean over the scored (frame, replicate) pairs of the log evidence
    log mean_{k, s, u} sum_c sum_r L (module docstring)."""
    from spiscape.io.photons import PhotonDataset
    from spiscape.io.replicate import read_replicate

    z = np.asarray(z, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    tilts = np.eye(3)[None] if tilts is None else np.asarray(tilts, dtype=np.float64)
    # log of the number of (k, s, u) the evidence averages over
    log_cells = float(np.log(z.shape[0] * sizes.size * tilts.shape[0]))
    evidence, pairs = 0.0, 0
    with torch.no_grad():
        vols = model.symmetric(torch.as_tensor(z, dtype=torch.float32, device=device))
    cx, cy = geometry.pixel_coords_2d(det)
    # the volume's grid holds |q| <= (V // 2 - 1) voxels; the largest slice scale decides
    largest = float(np.exp(np.max(classes.log_scale, initial=0.0) + sizes.max()))
    q_max = (model.volume_size // 2 - 1) * q_step / largest
    total = np.zeros((num_frames, z.shape[1]))
    spread = np.zeros_like(total)
    drawn = np.zeros(num_frames, dtype=np.int64)
    with PhotonDataset(photons, num_pix=det.num_pix) as dataset:
        for path in replicates:
            start = time.perf_counter()
            rep = read_replicate(path, details=True)
            trained = trained_classes(rep, path, classes, num_frames)
            if trained is None:
                continue
            mine = np.flatnonzero(classes.replicate == rep.number)
            pix = used_pixels(det, rep.model_pixels, q_min, q_max)
            size = rep.intens.shape[-1]
            table = geometry.rotation_table(cx[pix], cy[pix], np.asarray(rep.angles), size)
            operator = kernels.view_operator(table.index, table.weight, size, xp)
            scored = 0
            rows_of = np.arange(rep.frames.size)
            if subset is not None:
                rows_of = rows_of[np.asarray(subset, dtype=bool)[rep.frames]]
            for a in range(0, rows_of.size, block):
                here = rows_of[a:a + block]
                frames = rep.frames[here]
                cand = candidates(rep.occupancies[here], trained)
                acc = np.full((frames.size, z.shape[0]), -np.inf)
                csr = dataset.read(frames).to_csr()[:, pix].astype(np.float64).tocsr()
                counts = kernels.view_operator_on(csr, xp)
                for c in mine:
                    rows = np.flatnonzero(cand[:, classes.klass[c]])
                    if not rows.size:
                        continue
                    part = counts[rows] if xp is np else counts[xp.asarray(rows)]
                    for step in sizes:
                        for tilt in tilts:
                            models = xp.asarray(class_models(model, vols, classes.quaternion[c],
                                                             classes.log_scale[c], step, tilt))
                            lk = to_numpy(frame_log_likelihood(
                                part, log_views(models, operator, table.num_rot, xp), xp))
                            acc[rows] = np.logaddexp(acc[rows], lk)
                seen = np.isfinite(acc).any(axis=1)
                top = acc[seen].max(axis=1, keepdims=True)
                post = np.exp(acc[seen] - top)
                total_lk = post.sum(axis=1, keepdims=True)
                evidence += float((top + np.log(total_lk)).sum()) - log_cells * int(seen.sum())
                pairs += int(seen.sum())
                post /= total_lk
                mean, sd = _moments(post, z)
                total[frames[seen]] += mean
                spread[frames[seen]] += sd
                drawn[frames[seen]] += 1
                scored += int(seen.sum())
            log.info("per-frame latents, replicate %d: %d of %d frames scored against %d "
                     "classes x %d latent points x %d sizes x %d tilts x %d angles on %d pixels "
                     "(%.1f s)", rep.number, scored, rows_of.size, mine.size, z.shape[0],
                     sizes.size, tilts.shape[0], table.num_rot, pix.size,
                     time.perf_counter() - start)
    latent = np.full_like(total, np.nan)
    sd = np.full_like(total, np.nan)
    ok = drawn > 0
    latent[ok] = total[ok] / drawn[ok, None]
    sd[ok] = spread[ok] / drawn[ok, None]
    return {"latent": latent, "sd": sd, "replicates": drawn,
            "evidence": evidence / pairs if pairs else float("nan")}


def global_orientations(point_group: str, step_deg: float = GLOBAL_STEP) -> np.ndarray:
    """(O, 4) a near-uniform grid of ``step_deg`` over the orientations a volume of the point
    group can show apart: its asymmetric unit (:mod:`spiscape.orient.rotations`)."""
    from spiscape.orient import rotations

    group = rotations.point_group(point_group)
    return rotations.asymmetric_unit(rotations.so3_grid(step_deg), group)


def trained_classes(rep, path, classes: Classes, num_frames: int) -> np.ndarray | None:
    """(M,) bool: the replicate's classes the VAE trained on (None when none of them), after
    checking that its frame indices lie inside the dataset of ``num_frames``."""
    mine = classes.klass[classes.replicate == rep.number]
    if not mine.size:
        return None
    if rep.frames.size and rep.frames.max() >= num_frames:
        raise InputError(path, f"frame index {rep.frames.max()} is outside the dataset of "
                               f"{num_frames} frames")
    trained = np.zeros(rep.occupancies.shape[1], dtype=bool)
    trained[mine] = True
    return trained


def scored_frames(replicates, classes: Classes, num_frames: int) -> np.ndarray:
    """(N,) bool: the frames with a candidate class among the trained ones in some replicate
    (the frames :func:`posterior_latents` scores; the others, e.g. a contaminant cluster's,
    keep no latent)."""
    from spiscape.io.replicate import read_replicate

    out = np.zeros(num_frames, dtype=bool)
    for path in replicates:
        rep = read_replicate(path, models=False)
        trained = trained_classes(rep, path, classes, num_frames)
        if trained is not None:
            out[rep.frames[candidates(rep.occupancies, trained).any(axis=1)]] = True
    return out


def global_latents(model, det, photons, z: np.ndarray, scored: np.ndarray, q_min: float = 0.0,
                   q_step: float = 1.0, sizes=SIZES, step_deg: float = GLOBAL_STEP,
                   refine: int = 0, xp=np, block: int = 1024, device="cpu") -> dict:
    """Each scored frame's posterior mean latent ``latent`` (N, zdim) and ``sd`` with its
    orientation searched over all of the asymmetric unit (:func:`global_orientations`, flat
    prior) instead of its classes' patches: the decoder's volume at every latent point z_k and
    size step s is sliced at every grid orientation onto the frame's own pixels (its detector's
    Ewald q), and

        p(z_k | d) ∝ sum_s sum_o L_d(s, o, k),

    L the multinomial likelihood of the module docstring. ``evidence``: the mean over the
    scored frames of log mean_{k, s, o} L. ``size`` and ``size_sd``: the posterior mean and
    standard deviation of the frame's size factor exp(s) relative to the decoder's volume at
    its latent (each frame's particle size; the steps bound it). NaN for frames not ``scored``.

    ``refine``: EM iterations of the K volumes from the frames themselves before the final
    posterior (:func:`refine_volumes`): the decoder's volumes are learnt from 2D class averages,
    which mix neighbouring shapes; the frames' own photons, weighted by their posterior over
    (k, s, o), re-estimate each volume. The latent points z_k stay where the decoder put them.
    ``evidence_steps``: the evidence before each iteration (the decoder's first); ``volumes``:
    the refined volumes (K, V, V, V) at ``z`` (None without ``refine``), the frames' own 3D
    intensities along the latent (:func:`volumes_along`)."""
    from scipy.special import logsumexp

    from spiscape.io.photons import PhotonDataset

    z = np.asarray(z, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    scored = np.asarray(scored, dtype=bool)
    quats = global_orientations(model.point_group, step_deg)
    largest = float(np.exp(sizes.max()))
    q_max = (model.volume_size // 2 - 1) * q_step / largest
    pix = used_pixels(det, np.arange(det.num_pix), q_min, q_max)
    with torch.no_grad():
        vols = model.symmetric(torch.as_tensor(z, dtype=torch.float32, device=device))
    frames = np.flatnonzero(scored)
    with PhotonDataset(photons, num_pix=det.num_pix) as dataset:
        csr = dataset.read(frames).to_csr()[:, pix].tocsr()
    search = _GlobalSearch(model, det, pix, quats, sizes, q_step, csr, xp, block, device)
    log_cells = float(np.log(z.shape[0] * len(quats) * sizes.size))
    start = time.perf_counter()
    steps = []
    for _ in range(refine):
        acc = search.log_likelihood(vols)
        log_z = logsumexp(acc, axis=(1, 2))
        steps.append(float(log_z.mean()) - log_cells if frames.size else float("nan"))
        vols = search.refine(vols, log_z)
    acc = search.log_likelihood(vols)  # (N, S, K)
    log_z = logsumexp(acc, axis=(1, 2))
    post = np.exp(acc - log_z[:, None, None])
    latent = np.full((scored.size, z.shape[1]), np.nan)
    sd = np.full_like(latent, np.nan)
    latent[frames], sd[frames] = _moments(post.sum(axis=1), z)
    size = np.full(scored.size, np.nan)
    size_sd = np.full_like(size, np.nan)
    size_mean, size_spread = _moments(post.sum(axis=2), np.exp(sizes)[:, None])
    size[frames], size_sd[frames] = size_mean[:, 0], size_spread[:, 0]
    evidence = float(log_z.mean()) - log_cells if frames.size else float("nan")
    log.info("per-frame latents: %d frames scored against %d latent points x %d sizes x %d "
             "orientations (a %g degree grid) on %d pixels, %d EM iteration(s) of the volumes "
             "from the frames (mean log evidence %s%.2f; %.1f s)", frames.size, z.shape[0],
             sizes.size, len(quats), step_deg, pix.size, refine,
             "".join(f"{e:.2f} -> " for e in steps), evidence, time.perf_counter() - start)
    refined = None
    if refine:
        from spiscape.vae.model import unfold_octant

        with torch.no_grad():
            full = unfold_octant(vols, model.volume_size) if model.octant else vols
        refined = full.float().cpu().numpy()
    return {"latent": latent, "sd": sd, "evidence": evidence, "evidence_steps": steps,
            "volumes": refined, "size": size, "size_sd": size_sd}


def _moments(post: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and standard deviation (n, D) of ``values`` (C, D) under ``post`` (n, C),
    each row normalised."""
    mean = post @ values
    return mean, np.sqrt(np.maximum(post @ values**2 - mean**2, 0.0))


class _GlobalSearch:
    """The frames (CSR, used pixels), the orientation grid and the size steps of
    :func:`global_latents`, and the two passes over them: the E-step's log-likelihood summed
    over (s, o) and the M-step of :func:`refine_volumes`."""

    def __init__(self, model, det, pix, quats, sizes, q_step, csr, xp, block, device):
        from spiscape.vae.model import quaternion_to_matrix

        self.model, self.sizes, self.csr, self.xp, self.block = model, sizes, csr, xp, block
        self.rot = quaternion_to_matrix(torch.as_tensor(quats, dtype=torch.float32)).to(device)
        self.q = torch.as_tensor(np.stack([det.qx, det.qy, det.qz])[:, pix] / q_step,
                                 dtype=torch.float32, device=device)
        self.num_o = len(quats)

    def views(self, vols):
        """(rotations (O', 3, 3) scaled by the size step, views (K, O', P) on the array module)
        for one size step and a chunk of O' orientations at a time (m-3m at 8 degrees: all 1211 in
        one chunk, 0.4 GB for 2000 pixels)."""
        from spiscape.vae.model import slice_volumes

        num_z, num_pix = vols.shape[0], self.q.shape[1]
        chunk = max(1, int(VIEW_BYTES // (8 * num_z * max(num_pix, 1))))
        for s, step in enumerate(self.sizes):
            for first in range(0, self.num_o, chunk):
                part_rot = self.rot[first:first + chunk] * float(np.exp(step))
                with torch.no_grad():
                    views = slice_volumes(vols, self.q,
                                          part_rot[None].expand(num_z, -1, -1, -1),
                                          folded=self.model.octant)
                yield s, part_rot, self.xp.asarray(views.cpu().numpy().astype(np.float32))

    def counts(self):
        """(first frame, dense counts (b, P) on the array module) ``block`` frames at a time:
        a BLAS product against the log views is 4-20 times faster than the sparse one at
        300-3500 photons a frame (2 CPU cores), 4 bytes a pixel.

        Single precision, as the 2D EMC's likelihood (:func:`spiscape.emc.kernels.
        block_log_likelihood`): the products against the float32 log views run 2.2 times as
        fast as in double on 2 CPU cores, and a frame's log-likelihood (some 10^3-10^4 in
        magnitude) is off by at most ~2e-3 (0.2 % of a posterior weight); the sums over
        frames, sizes and orientations are kept in double."""
        for a in range(0, self.csr.shape[0], self.block):
            yield a, self.xp.asarray(self.csr[a:a + self.block].toarray().astype(np.float32))

    def log_likelihood(self, vols) -> np.ndarray:
        """(N, S, K): log sum_o L_d(s, o, k) of every frame under the volumes (K, ...) at every
        size step s."""
        acc = np.full((self.csr.shape[0], len(self.sizes), vols.shape[0]), -np.inf)
        for s, _, views in self.views(vols):
            logv = log_normalised(views, 1e-6 * views.max(axis=-1, keepdims=True), self.xp)
            del views
            for a, counts in self.counts():
                part = to_numpy(frame_log_likelihood(counts, logv, self.xp))
                here = acc[a:a + part.shape[0], s]
                acc[a:a + part.shape[0], s] = np.logaddexp(here, part)
        return acc

    def refine(self, vols, log_z: np.ndarray):
        """One M-step (:func:`refine_volumes`) from the frames' posterior (their log evidence
        ``log_z`` under ``vols`` normalises it)."""
        xp = self.xp
        num_z = vols.shape[0]
        photons = xp.asarray(np.asarray(self.csr.sum(axis=1)).ravel().astype(np.float32))
        log_z = xp.asarray(log_z, dtype=np.float32)
        ratio = torch.zeros_like(vols, dtype=torch.float64)
        exposure = torch.zeros_like(vols, dtype=torch.float64)
        for _, part_rot, views in self.views(vols):
            cells = views.shape[0] * views.shape[1]
            floor = 1e-6 * views.max(axis=-1, keepdims=True)  # the likelihood's floor, (K, O', 1)
            logv = log_normalised(views, floor, xp).reshape(cells, -1)
            view_sum = xp.maximum(views.sum(axis=-1).reshape(cells), xp.finfo(views.dtype).tiny)
            tomograms = xp.zeros_like(logv)  # sum_d p_d(cell) K_dt
            weight = xp.zeros(cells)  # sum_d p_d(cell) phi_d(cell)
            # (a cell: one latent point at one orientation of this chunk and size step)
            for a, counts in self.counts():
                b = counts.shape[0]
                resp = xp.exp(kernels.product(counts, logv.T, xp) - log_z[a:a + b, None])
                tomograms += resp.T @ counts
                weight += (resp.T @ photons[a:a + b]).astype(np.float64)
            del logv
            weight /= view_sum  # the frame's fluence at the cell: its photons over the view's sum
            tomograms /= xp.maximum(views, floor).reshape(cells, -1)
            del views
            rot = part_rot[None].expand(num_z, -1, -1, -1)
            ratio += back_project(vols.shape, self.q, rot, tomograms.reshape(num_z, -1,
                                   tomograms.shape[-1]), self.model.octant)
            exposure += back_project(vols.shape, self.q, rot, xp.broadcast_to(
                weight.reshape(num_z, -1, 1), (num_z, weight.size // num_z, self.q.shape[1])),
                self.model.octant)
        return refine_volumes(vols, ratio, exposure, self.model.point_group, self.model.octant)


def back_project(shape, q, rotations, values, folded: bool) -> torch.Tensor:
    """The adjoint of :func:`spiscape.vae.model.slice_volumes` (trilinear): ``values`` (K, O, P)
    on the slices' points spread onto volumes of ``shape`` (K, ...), float64."""
    from spiscape.vae.model import slice_volumes

    grid = torch.zeros(tuple(shape), dtype=torch.float32, device=q.device, requires_grad=True)
    out = slice_volumes(grid, q, rotations, folded=folded)
    weights = torch.as_tensor(np.ascontiguousarray(to_numpy(values)), dtype=torch.float32,
                              device=q.device)
    (adjoint,) = torch.autograd.grad(out, grid, grad_outputs=weights)
    return adjoint.double()


def refine_volumes(vols, ratio, exposure, point_group: str, octant: bool):
    """The M-step of the frames' EM: the maximum-likelihood EM update of Poisson intensities seen
    through the trilinear slices B_kso (latent point k, size step s, orientation o),

        I_k(x) <- I_k(x) sum_dso p_d(k,s,o) [B_kso^T (K_d / B_kso I_k)](x)
                         / sum_dso p_d(k,s,o) phi_dkso [B_kso^T 1](x),

    with p_d the frame's posterior under the current volumes and phi_dkso = |K_d| / sum_t
    (B_kso I_k)_t its maximum-likelihood fluence there; ``ratio`` and ``exposure`` are the two
    back-projected sums. It raises the frames' likelihood for fixed posteriors and fluences and
    does not blur: a volume whose slices predict the photons is a fixed point. (The EMC's merge,
    sum p K back-projected over sum p phi back-projected, spreads each photon over the grid
    points around it: from the decoder's volumes it lowered the frames' mean log evidence on the
    three sets of the matrix tried, by 0.3-30 per frame, and their rank correlation with the
    shape on one, ``sim72lowphot`` 0.927 -> 0.919.) Both sums are
    averaged over the point group first (the decoder's volumes are symmetric); voxels no frame
    reaches keep their value."""
    from spiscape.vae.model import permutation_average, symmetrise

    if octant:
        ratio, exposure = permutation_average(ratio), permutation_average(exposure)
    else:
        ratio, exposure = symmetrise(ratio, point_group), symmetrise(exposure, point_group)
    old = vols.double()
    out = torch.where(exposure > 0, old * ratio / exposure.clamp_min(1e-300), old)
    return out.to(vols.dtype)


def tilt_sample(classes: Classes, replicates, num_frames: int, count: int = TILT_CLASSES,
                seed: int = 0) -> tuple[Classes, np.ndarray]:
    """What :func:`choose_tilt` scores: ``count`` of the trained classes at random, among those
    that are some frame's best, and the frames (N,) bool whose largest occupancy among their
    replicate's trained classes falls on one of them (none when no frame has a trained class).
    The slices and views of every (class, size, tilt), not the frames, are most of the cost, so
    a sample of classes (with all their frames) is what makes the choice cheap."""
    from spiscape.io.replicate import read_replicate

    best_of = {}  # replicate -> (frames, their best trained class)
    for path in replicates:
        rep = read_replicate(path, models=False)
        columns = classes.klass[classes.replicate == rep.number]
        if not columns.size:
            continue
        occ = rep.occupancies[:, columns]
        has = occ.max(axis=1) > 0
        best_of[rep.number] = (rep.frames[has], columns[occ.argmax(axis=1)[has]])
    eligible = np.array([i for i, (r, k) in enumerate(zip(classes.replicate, classes.klass,
                                                             strict=True))
                         if r in best_of and np.any(best_of[r][1] == k)], dtype=np.int64)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(eligible, size=min(count, eligible.size), replace=False))
    sample = Classes(replicate=classes.replicate[pick], klass=classes.klass[pick],
                     quaternion=classes.quaternion[pick], log_scale=classes.log_scale[pick])
    frames = np.zeros(num_frames, dtype=bool)
    for number, (drawn, best) in best_of.items():
        frames[drawn[np.isin(best, sample.klass[sample.replicate == number])]] = True
    return sample, frames


def choose_tilt(score, angles=TILT_ANGLES) -> tuple[float, dict]:
    """The tilt angle (degrees) among ``angles`` under which the frames are most probable, and
    the mean log evidence of the angles scored. ``score(angle)`` returns
    :func:`posterior_latents`'s ``evidence`` on one sample (:func:`tilt_sample`). The angles are
    scored in increasing order until the evidence falls (it has one maximum over the angle: a
    patch's width), so a dataset that wants no tilt pays for two angles."""
    table: dict[float, float] = {}
    best = -np.inf  # the largest finite evidence so far
    for angle in sorted(float(a) for a in angles):
        table[angle] = value = float(score(angle))
        if np.isfinite(value):
            if value < best:
                break
            best = value
    finite = {a: v for a, v in table.items() if np.isfinite(v)}
    if not finite:
        raise InputError(None, "no frame of the sample could be scored to choose the tilt")
    return max(finite, key=finite.get), table
