"""EMC 2D kernels, written against an array module ``xp`` (NumPy or CuPy).

Notation (Dragonfly's): frame d, detector pixel t, class m, in-plane rotation r; ``K_dt`` photon
counts, ``W_mrt`` the view of class m at rotation r on the detector, ``φ_d`` the frame's scale.

E-step, in a block of frames: ``R_dj = Σ_t K_dt log W_tj − φ_d Σ_t W_tj`` for every view
j = (class m, rotation r), then ``P_dj ∝ exp(β_d (R_dj − max R_d))``. M-step: ``Σ_d P_dj K_dt``
and ``Σ_d P_dj φ_d`` merged back onto the grid with the adjoint of the view (bilinear weights),
and divided. The products with K run over pixel chunks, each dense (BLAS / cuBLAS) or CSR (SciPy /
cuSPARSE) as :mod:`spiscape.emc.frames` decides from the photon density; the engine lays views
out pixel-major, (P, R·M) with ``j = r·M + m``, so that both products and the merge are plain
matrix products without transposed copies.

Every function here is pure and takes small arrays, so the tests can check each against a
direct loop over frames, classes and rotations.
"""

from __future__ import annotations

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
    return view_operator_on(op, xp)


def view_operator_on(operator, xp=np):
    """A SciPy CSR operator on the array module's device (itself on NumPy)."""
    if xp is np:
        return operator
    return sparse_module(xp).csr_matrix(operator)


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


def log_views(views, xp):
    """log W with a floor relative to the mean view (grid corners no pixel ever reached)."""
    floor = LOG_FLOOR * float(views.mean()) + np.finfo(np.float32).tiny
    return xp.log(xp.maximum(views, floor))


#: shifted log-probabilities at or below this are 0 (see :func:`responsibilities`)
LOG_PROB_CUT = -50.0


def responsibilities(log_r, beta, xp):
    """Annealed probabilities from the log-likelihoods ``log_r`` (b, M·R), in place.

    Returns P_dmr ∝ exp(β_d (R_dmr − max R_d)) normalised per frame, the log-sum-exp of R_d at
    β = 1 (the frame's log-likelihood under the mixture, up to a constant) and the mutual
    information Σ_j P_dj log(P_dj · M·R) per frame, computed from the shifted values so that no
    log of P is taken.
    """
    top = log_r.max(axis=1, keepdims=True)
    log_r -= top  # shifted, all <= 0
    # exp of anything below LOG_PROB_CUT would be a float32 subnormal (below 1.2e-38) or close
    # to one: subnormals make every later product 5-50 times slower on x86 CPUs, and late in
    # the annealing most entries are there. They are set to exactly 0 (each < 2e-22 of the
    # frame's largest, which is 1)
    logsum = top[:, 0].astype(xp.float64) + xp.log(
        xp.exp(xp.maximum(log_r, LOG_PROB_CUT)).sum(axis=1, dtype=xp.float64))
    scaled = log_r * beta[:, None].astype(log_r.dtype)
    prob = xp.exp(xp.maximum(scaled, LOG_PROB_CUT))
    prob[scaled <= LOG_PROB_CUT] = 0
    norm = prob.sum(axis=1, dtype=xp.float64)
    prob /= norm[:, None].astype(prob.dtype)
    mutual_info = (prob * scaled).sum(axis=1, dtype=xp.float64) - xp.log(norm)
    mutual_info += np.log(log_r.shape[1])
    return prob, logsum, mutual_info


#: entries of P below this fraction of the frame's largest are dropped from the M-step
DROP_PROB_BELOW = 1e-6
#: the M-step takes P as CSR when fewer than this share of its entries are kept (late in the
#: annealing, when each frame sits on a few (class, rotation) pairs): a CSR product costs
#: 10 to 20 times more per term than a dense one on CPUs, so it wins below ~5 % of the entries
SPARSE_PROB_BELOW = 0.05


def pixel_major_operator(index: np.ndarray, weight: np.ndarray, size: int, xp=np):
    """The view operator with rows ``t·R + r`` (pixel-major), from a rotation table's ``index``
    and ``weight`` of shape (R, P, 4): ``op @ models.T`` is (P·R, M), i.e. views laid out as
    (P, R·M) with view index ``j = r·M + m``, ready to be the right-hand side of ``K @ log W``."""
    return view_operator(index.transpose(1, 0, 2), weight.transpose(1, 0, 2), size, xp)


def rotation_sums(operator, rows_per_pixel: int, pixel_weight, xp=np):
    """(R, S²): Σ_t w_t E_(t r), g for an operator with rows ``t·R + r`` (pixel weights w_t).

    With w = the used-pixel indicator, ``sums @ models.T`` is Σ_t W_tj over used pixels for every
    view (the E-step's ``φ_d Σ_t W``); with w = 1, ``den (R, M).T @ sums`` merges a per-view
    weight onto the grid (the M-step's denominator) without ever expanding it to pixels.
    """
    import scipy.sparse

    num_pix = operator.shape[0] // rows_per_pixel
    r = np.tile(np.arange(rows_per_pixel), num_pix)
    rows = np.arange(num_pix * rows_per_pixel)
    w = np.repeat(np.asarray(pixel_weight, dtype=np.float32), rows_per_pixel)
    select = scipy.sparse.csr_matrix((w, (r, rows)), shape=(rows_per_pixel, rows.size))
    host = operator if xp is np else operator.get()
    return xp.asarray((select @ host).toarray())


def product(a, b, xp=np):
    """``a @ b`` as a dense array, whichever of them is a (SciPy or CuPy) sparse matrix."""
    out = a @ b
    if hasattr(out, "toarray"):
        out = out.toarray()
    return out


def block_log_likelihood(parts, log_view_chunks, view_sums, scale, xp):
    """R_dj = Σ_t K_dt log W_tj − φ_d Σ_t W_tj (b, R·M) float32, summed over pixel chunks.

    ``parts[i]`` (b × chunk) holds the photons on pixel chunk i, dense (BLAS / cuBLAS) or CSR
    (SciPy / cuSPARSE); ``log_view_chunks`` yields chunk i's log-views (chunk × R·M), zero on
    pixels that are merged but not used in the likelihood: a list, or a generator that makes
    them one at a time (then only one chunk's log-views exist at once); ``view_sums`` (R·M,)
    Σ_t W_tj over used pixels.
    """
    log_r = None
    for part, lw in zip(parts, log_view_chunks, strict=True):
        term = product(part, lw, xp)
        if log_r is None:
            log_r = term if term.flags.c_contiguous else xp.ascontiguousarray(term)
        else:
            log_r += term
        del lw, term  # before the generator makes the next chunk's
    log_r -= (scale[:, None] * view_sums[None, :]).astype(log_r.dtype)
    return log_r


def sparse_probabilities(prob, xp):
    """P with entries below ``DROP_PROB_BELOW`` of each frame's largest dropped, as CSR when
    fewer than ``SPARSE_PROB_BELOW`` of them remain (NumPy only: on a GPU the dense product is
    faster at any density); otherwise None."""
    if xp is not np:
        return None
    keep = prob >= DROP_PROB_BELOW * prob.max(axis=1, keepdims=True)
    if keep.mean() >= SPARSE_PROB_BELOW:
        return None
    import scipy.sparse

    return scipy.sparse.csr_matrix(np.where(keep, prob, 0).astype(np.float32))


def block_numerators(parts_t, prob, xp, prob_sparse=None):
    """Σ_d P_dj K_dt for each pixel chunk: a list of (chunk, R·M) arrays.

    ``parts_t[i]`` (chunk × b) is the transpose of the block's photons on chunk i, dense or CSR;
    ``prob`` (b, R·M) the probabilities and ``prob_sparse`` their CSR form when they are sparse
    (:func:`sparse_probabilities`). The CSR form serves the dense chunks only (dense × CSR costs
    the kept probabilities × the chunk's pixels); a CSR chunk takes the dense probabilities
    (CSR × dense costs its photons × R·M), since a CSR × CSR product (SpGEMM, then a dense
    chunk × R·M result) costs several times more than either.
    """
    return [chunk_numerator(part_t, prob, xp, prob_sparse) for part_t in parts_t]


def chunk_numerator(part_t, prob, xp, prob_sparse=None):
    """One pixel chunk's Σ_d P_dj K_dt (chunk, R·M) (see :func:`block_numerators`)."""
    dense_chunk = not hasattr(part_t, "tocsr")
    return product(part_t, prob_sparse if prob_sparse is not None and dense_chunk else prob, xp)


def merge_numerators(numerators, merge_ops, num_classes: int):
    """Σ_(t r) E_(t r), g N_t,(r m) (S², M): the chunks' numerators merged onto the grid;
    ``merge_ops[i]`` is the transpose (S² × chunk·R) of chunk i's rows of the pixel-major
    operator."""
    grid = None
    for num, op_t in zip(numerators, merge_ops, strict=True):
        merged = op_t @ num.reshape(-1, num_classes)
        grid = merged if grid is None else grid + merged
    return grid


def beta_schedule(photons, iteration: int, beta_start, jump: float, period: int):
    """β_d at an iteration (0-based): a start value per frame, times ``jump`` every ``period``.

    ``beta_start`` "auto" gives β_d = 1/√(photons_d): the log-likelihood differences between
    orientations grow with the photon count, and this keeps the first iterations soft whatever
    the fluence. "mean" gives every frame 1/√(mean photons) (the mean of ``photons``; a sharded
    caller passes the global mean as a number instead). Capped at 1 (β = 1 is plain EM).
    """
    photons = np.maximum(np.asarray(photons, dtype=np.float64), 1.0)
    if beta_start == "auto":
        start = 1.0 / np.sqrt(photons)
    elif beta_start == "mean":
        start = np.full_like(photons, 1.0 / np.sqrt(photons.mean()))
    else:
        start = np.full_like(photons, float(beta_start))
    factor = jump ** (iteration // max(period, 1))
    return np.minimum(start * factor, 1.0)
