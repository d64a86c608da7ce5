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
    """P_dmr ∝ exp(β_d (R_dmr − max R_d)), normalised per frame; returns (P, logsumexp at β=1)."""
    top = log_r.max(axis=1, keepdims=True)
    shifted = log_r - top
    prob = xp.exp(beta[:, None] * shifted)
    prob /= prob.sum(axis=1, keepdims=True)
    logsum = top[:, 0] + xp.log(xp.exp(shifted).sum(axis=1))
    return prob, logsum


def e_step_block(
    counts_used,
    counts_merge,
    log_w_used,
    view_sums,
    scale,
    beta,
    xp,
    need_scaling: bool = True,
    drop_below: float = 1e-10,
):
    """E-step and M-step partial sums for one block of frames.

    counts_used (b, P_used) and counts_merge (b, P_merge) are dense photon counts on the pixels
    used in the likelihood and on those merged into the model; log_w_used (P_used, M·R) the
    log-views on used pixels; view_sums (M·R,) Σ_t W_mrt over used pixels; scale (b,) φ_d.
    """
    num_mr = log_w_used.shape[1]
    log_r = (counts_used @ log_w_used).astype(xp.float64)
    log_r -= scale[:, None] * view_sums[None, :]
    prob, logsum = responsibilities(log_r, beta, xp)
    if drop_below > 0:
        prob[prob < drop_below] = 0.0
        prob /= prob.sum(axis=1, keepdims=True)
    prob32 = prob.astype(xp.float32)
    numerator = prob32.T @ counts_merge
    denominator = prob.T @ scale
    photons = counts_used.sum(axis=1).astype(xp.float64)
    if need_scaling:
        expected = prob @ view_sums
        new_scale = xp.where(expected > 0, photons / xp.maximum(expected, 1e-300), scale)
    else:
        new_scale = scale
    log_likelihood = float((logsum - np.log(num_mr)).sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = xp.where(prob > 0, prob * xp.log(prob * num_mr), 0.0)
    mutual_info = float(plogp.sum())
    best = prob.argmax(axis=1)
    return BlockResult(
        numerator=numerator,
        denominator=denominator,
        occupancies=prob,  # reduced to (b, M) by the caller, who knows R
        best=best,
        new_scale=new_scale,
        log_likelihood=log_likelihood,
        mutual_info=mutual_info,
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
