"""EMC 2D kernels, written against an array module ``xp`` (NumPy or CuPy).

Notation (Dragonfly's): frame d, detector pixel t, class m, in-plane rotation r; ``K_dt`` photon
counts, ``W_mrt`` the view of class m at rotation r on the detector, ``φ_d`` the frame's scale.

E-step, in a block of frames: ``R_dmr = Σ_t K_dt log W_mrt − φ_d Σ_t W_mrt`` (a dense matrix
product of the block's photon matrix with the log-views, BLAS on CPU, cuBLAS on GPU), then
``P_dmr ∝ exp(β_d (R_dmr − max R_d))``. M-step: ``Σ_d P_dmr K_dt`` and ``Σ_d P_dmr φ_d`` merged
back onto the grid with the adjoint of the view (bilinear weights), and divided.

Every function here is pure and takes small arrays, so the tests can check each against a
direct loop over frames, classes and rotations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: views below this fraction of the mean are floored before the log (empty grid corners)
LOG_FLOOR = 1e-8


def sparse_module(xp):
    if xp is np:
        import scipy.sparse

        return scipy.sparse
    import cupyx.scipy.sparse

    return cupyx.scipy.sparse


def view_operator(index: np.ndarray, weight: np.ndarray, size: int, xp=np):
    """Sparse matrix E (R·P × S²) such that ``views = models_flat @ E.T`` and ``merge = v @ E``."""
    import scipy.sparse

    num_rot, num_pix, _ = index.shape
    rows = np.repeat(np.arange(num_rot * num_pix), 4)
    op = scipy.sparse.csr_matrix(
        (weight.ravel().astype(np.float32), (rows, index.ravel())),
        shape=(num_rot * num_pix, size * size),
    )
    op.sum_duplicates()
    if xp is np:
        return op
    return sparse_module(xp).csr_matrix(op)


def expand(models_flat, operator, num_rot: int):
    """Views W (M, R, P) of the models (M, S²) at every rotation."""
    num_models = models_flat.shape[0]
    views = (operator @ models_flat.T).T  # (M, R·P)
    return views.reshape(num_models, num_rot, -1)


def merge(values, operator):
    """Adjoint of :func:`expand`: (M, R, P) per-rotation pixel values summed onto (M, S²)."""
    num_models = values.shape[0]
    flat = values.reshape(num_models, -1)
    return (operator.T @ flat.T).T


def ml_update(models_flat, views, numerator, grid_den, operator, iterations: int, xp):
    """The exact M-step for views that interpolate the models bilinearly (M, S²).

    Each photon at detector pixel t of rotation r is a mixture of the grid points that its view
    interpolates, so with the probabilities P_dmr fixed the EM update of a model is
    ``M_j ← M_j Σ_rt E_rt,j (Σ_d P_dmr K_dt) / W_mrt  /  Σ_rt E_rt,j Σ_d P_dmr φ_d``
    (Richardson-Lucy on the merge): each step raises the expected log-likelihood, and at its
    fixed point the *views* match the photons, where the plain merge
    ``Σ_rt E_rt,j Σ_d P K / Σ_rt E_rt,j Σ_d P φ`` matches them only after the bilinear blur.
    ``views`` (M, R, P) are those of ``models_flat`` (the E-step's, reused for the first step);
    ``numerator`` (M, R, P) Σ_d P_dmr K_dt; ``grid_den`` (M, S²) the merged Σ_d P_dmr φ_d.
    """
    num_rot = views.shape[1]
    current = models_flat
    inverse = 1.0 / xp.maximum(grid_den, 1e-30)
    for step in range(iterations):
        if step:
            views = expand(current, operator, num_rot)
        floor = LOG_FLOOR * float(views.mean()) + np.finfo(np.float32).tiny
        ratio = numerator / xp.maximum(views, floor)
        current = current * merge(ratio, operator) * inverse
    return current


@dataclass
class BlockResult:
    """What the E-step of one block of frames contributes to the M-step and to the log."""

    numerator: object  # (M·R, P_merge) Σ_d P_dmr K_dt
    denominator: object  # (M·R,) Σ_d P_dmr φ_d
    occupancies: object  # (b, M)
    best: object  # (b,) flat index m·R + r of the most probable pair
    new_scale: object  # (b,)
    log_likelihood: float
    mutual_info: float


def log_views(views, xp):
    """log W with a floor relative to the mean view (grid corners no pixel ever reached)."""
    floor = LOG_FLOOR * float(views.mean()) + np.finfo(np.float32).tiny
    return xp.log(xp.maximum(views, floor))


def responsibilities(log_r, beta, xp):
    """Annealed probabilities from the log-likelihoods ``log_r`` (b, M·R), in place.

    Returns P_dmr ∝ exp(β_d (R_dmr − max R_d)) normalised per frame, the log-sum-exp of R_d at
    β = 1 (the frame's log-likelihood under the mixture, up to a constant) and the mutual
    information Σ_j P_dj log(P_dj · M·R) per frame, computed from the shifted values so that no
    log of P is taken.
    """
    top = log_r.max(axis=1, keepdims=True)
    log_r -= top  # shifted, all <= 0
    logsum = top[:, 0].astype(xp.float64) + xp.log(xp.exp(log_r).sum(axis=1, dtype=xp.float64))
    scaled = log_r * beta[:, None].astype(log_r.dtype)
    prob = xp.exp(scaled)
    norm = prob.sum(axis=1, dtype=xp.float64)
    prob /= norm[:, None].astype(prob.dtype)
    mutual_info = (prob * scaled).sum(axis=1, dtype=xp.float64) - xp.log(norm)
    mutual_info += np.log(log_r.shape[1])
    return prob, logsum, mutual_info


def weighted_photon_sums(prob, counts, xp, sparse_below: float = 0.02, drop_below: float = 1e-6):
    """Σ_d P_dj K_dt (M·R, P) for the M-step.

    Late in the annealing nearly all of a frame's probability sits on a few (class, rotation)
    pairs; entries below ``drop_below`` (relative to the frame's largest) are then dropped and
    the product is done with a sparse P when fewer than ``sparse_below`` of the entries remain.
    This is what keeps the M-step cheap with hundreds of classes and rotations.
    """
    keep = prob >= drop_below * prob.max(axis=1, keepdims=True)
    density = float(keep.mean())
    if density >= sparse_below:
        return prob.T @ counts
    sparse = sparse_module(xp).csr_matrix(xp.where(keep, prob, 0).astype(xp.float32))
    return xp.asarray(sparse.T @ counts)


def e_step_block(
    counts_used,
    counts_merge,
    log_w_used,
    view_sums,
    scale,
    beta,
    xp,
    need_scaling: bool = True,
):
    """E-step and M-step partial sums for one block of frames.

    counts_used (b, P_used) and counts_merge (b, P_merge) are dense float32 photon counts on the
    pixels used in the likelihood and on those merged into the model; log_w_used (P_used, M·R)
    the log-views on used pixels; view_sums (M·R,) Σ_t W_mrt over used pixels; scale (b,) φ_d;
    beta (b,) β_d. The heavy work is two dense matrix products (BLAS / cuBLAS) in float32.
    """
    log_r = counts_used @ log_w_used
    log_r -= (scale[:, None] * view_sums[None, :]).astype(log_r.dtype)
    prob, logsum, mutual_info = responsibilities(log_r, beta, xp)
    numerator = weighted_photon_sums(prob, counts_merge, xp)
    # float32 products (no float64 copy of P): sums of at most a block of positive terms
    denominator = (prob.T @ scale.astype(prob.dtype)).astype(xp.float64)
    photons = counts_used.sum(axis=1, dtype=xp.float64)
    if need_scaling:
        expected = (prob @ view_sums.astype(prob.dtype)).astype(xp.float64)
        new_scale = xp.where(expected > 0, photons / xp.maximum(expected, 1e-300), scale)
    else:
        new_scale = scale
    return BlockResult(
        numerator=numerator,
        denominator=denominator,
        occupancies=prob,  # reduced to (b, M) by the caller, who knows R
        best=prob.argmax(axis=1),
        new_scale=new_scale,
        log_likelihood=float((logsum - np.log(log_r.shape[1])).sum()),
        mutual_info=float(mutual_info.sum()),
    )


def beta_schedule(photons, iteration: int, beta_start, jump: float, period: int):
    """β_d at an iteration (0-based): a start value per frame, times ``jump`` every ``period``.

    ``beta_start`` "auto" gives β_d = 1/√(photons_d): the log-likelihood differences between
    orientations grow with the photon count, and this keeps the first iterations soft whatever
    the fluence. Capped at 1 (β = 1 is plain EM).
    """
    photons = np.maximum(np.asarray(photons, dtype=np.float64), 1.0)
    if beta_start == "auto":
        start = 1.0 / np.sqrt(photons)
    else:
        start = np.full_like(photons, float(beta_start))
    factor = jump ** (iteration // max(period, 1))
    return np.minimum(start * factor, 1.0)
