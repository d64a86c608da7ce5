"""The best common line of pairs of averages: batched products of normalised line stacks.

For a pair (i, j) with normalised lines ``a = lines[i]`` and ``b = lines[j]`` (``(L, R)``, see
:mod:`spiscape.commonlines.polar`) the Pearson CC of line ``la`` of i with line ``lb`` of j is
``C[la, lb] = a[la] · b[lb]`` when every line is measured on the same samples (``missing =
"common"``): one (L, R) × (R, L) product per pair, a batch of pairs one batched product. The pair's
common-line CC is ``max C`` and its angles those of the maximising (la, lb) (the first in
row-major order on ties).

With a mask that differs between lines (``missing = "overlap"``), Pearson over the samples
measured on both lines needs, with the shared 0/1 mask M (L, R) and lines zeroed where missing,

    n = M Mᵀ,  Sa = a Mᵀ,  Saa = a² Mᵀ,  Sb = M bᵀ,  Sbb = M (b²)ᵀ,  Sab = a bᵀ
    C = (Sab - Sa Sb / n) / sqrt((Saa - Sa² / n) (Sbb - Sb² / n))

elementwise over (la, lb): five products per pair instead of one (n is the same for all pairs,
since all averages share the support). Line pairs overlapping on fewer than half the samples of
the longest line, or with no variance over the overlap, are left out of the maximum.

Everything is written against an array module ``xp`` (NumPy, or CuPy on a GPU through
:func:`spiscape.backend.get_array_module`), so the GPU runs the same code. Each pair's result
depends only on its own two line stacks (one fixed-shape product per pair), so the CC does not
depend on how pairs are batched or tiled: bitwise with NumPy (tested), to rounding with CuPy,
whose batched GEMM may pick another kernel for another batch size. The GPU path is the same
code but has not been run here (no GPU); the CPU path is the reference.
"""

from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from spiscape.backend import get_array_module, to_numpy

log = logging.getLogger(__name__)

#: overlap below this fraction of the longest line's samples does not count (missing="overlap")
MIN_OVERLAP_FRACTION = 0.5
#: variance (of unit-norm lines) below which an overlap counts as constant
MIN_VARIANCE = 1e-10
#: default pairs per batch. On a CPU the (batch, L, L) blocks must stay in the core's cache: 8
#: pairs (2 MB of float64 CCs at L = 180) for the one-product path; 2 for the overlap path,
#: whose six (batch, L, L) temporaries are otherwise memory-bound (4x slower at 4 pairs)
DEFAULT_BATCH_CPU = 8
DEFAULT_BATCH_CPU_OVERLAP = 2
DEFAULT_BATCH_GPU = 2048


def best_line_pairs(a, b, xp=np):
    """Common-line CC of pairs whose lines share one mask: a, b (n, L, R) normalised lines.

    Returns ``cc (n,)``, ``index_a (n,)``, ``index_b (n,)`` (line indices of the maximum).
    """
    n, num_b = a.shape[0], b.shape[1]
    cc_matrix = xp.matmul(a, b.transpose(0, 2, 1)).reshape(n, -1)
    best = xp.argmax(cc_matrix, axis=1)
    cc = xp.take_along_axis(cc_matrix, best[:, None], axis=1)[:, 0]
    return cc, best // num_b, best % num_b


def overlap_cc(a, b, mask, xp=np):
    """Pearson CC of every line pair over its common measured samples: (n, La, Lb).

    a, b (n, L, R) are lines with missing samples set to 0, mask (L, R) their shared 0/1 mask.
    Line pairs with too small an overlap or no variance on it get -inf.
    """
    m = xp.asarray(mask, dtype=a.dtype)
    count = m @ m.T
    inv = 1.0 / xp.maximum(count, 1.0)
    min_count = max(3.0, MIN_OVERLAP_FRACTION * float(np.asarray(mask).sum(axis=1).max()))
    bt = b.transpose(0, 2, 1)
    sa = xp.matmul(a, m.T)  # [la, lb]: sum of a[la] over the overlap with line lb
    sb = xp.matmul(m, bt)  # [la, lb]: sum of b[lb] over the overlap with line la
    cov = xp.matmul(a, bt)
    cov -= sa * sb * inv
    var_a = xp.matmul(a * a, m.T)
    var_a -= sa * sa * inv
    var_b = xp.matmul(m, (b * b).transpose(0, 2, 1))
    var_b -= sb * sb * inv
    ok = (var_a > MIN_VARIANCE) & (var_b > MIN_VARIANCE) & (count >= min_count)
    var_a *= var_b
    var_a[~ok] = 1.0
    cov /= xp.sqrt(var_a)
    cov[~ok] = -xp.inf
    return cov


def best_overlap_pairs(a, b, mask, xp=np):
    """As :func:`best_line_pairs` with per line-pair overlap (mask (L, R) shared by all lines).

    A pair with no valid line pair gets CC 0 at angles (0, 0).
    """
    n, num_b = a.shape[0], b.shape[1]
    cc_matrix = overlap_cc(a, b, mask, xp).reshape(n, -1)
    best = xp.argmax(cc_matrix, axis=1)
    cc = xp.take_along_axis(cc_matrix, best[:, None], axis=1)[:, 0]
    valid = xp.isfinite(cc)
    best = xp.where(valid, best, 0)
    return xp.where(valid, cc, 0.0), best // num_b, best % num_b


def default_workers() -> int:
    """CPU threads for the correlation: the cores this process may use (at most 16)."""
    try:
        return max(1, min(16, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        return max(1, min(16, os.cpu_count() or 1))


def correlate_pairs(lines, mask, pair_i, pair_j, device: str = "cpu",
                    batch_pairs: int | None = None, precision: str = "float64",
                    workers: int | None = None, progress: bool = True, lines_b=None):
    """Common-line CC and best line indices of the pairs (pair_i[k], pair_j[k]).

    ``lines (A, L, R)`` normalised lines of all averages, ``mask (L, R)`` their measured samples
    (all True: the one-product path). Returns NumPy ``cc`` (float64), ``line_i``, ``line_j``.
    ``lines_b`` (same shape), when given, are the lines pair_j is taken from (the radially scaled
    stack of the size search); pair_i always comes from ``lines``.

    On a CPU, batches run on ``workers`` threads, each with single-threaded BLAS: the products
    are small (L × R × L), and OpenBLAS's own threads only contend on them (measured 10× slower
    on a busy 2-core machine). ``precision="float32"`` halves the work at ~1e-6 error in CC.
    """
    xp = get_array_module(device)
    pair_i = np.asarray(pair_i, dtype=np.int64)
    pair_j = np.asarray(pair_j, dtype=np.int64)
    num_pairs = pair_i.size
    common = bool(np.all(mask))
    if batch_pairs is None:
        cpu_batch = DEFAULT_BATCH_CPU if common else DEFAULT_BATCH_CPU_OVERLAP
        batch_pairs = cpu_batch if xp is np else DEFAULT_BATCH_GPU
    batch_pairs = max(1, int(batch_pairs))
    workers = 1 if xp is not np else (workers or default_workers())
    stack = xp.asarray(np.asarray(lines, dtype=np.dtype(precision)))
    stack_b = stack if lines_b is None else xp.asarray(np.asarray(lines_b,
                                                                  dtype=np.dtype(precision)))
    cc = np.empty(num_pairs)
    line_i = np.empty(num_pairs, dtype=np.int64)
    line_j = np.empty(num_pairs, dtype=np.int64)

    def batch(start: int) -> int:
        stop = min(start + batch_pairs, num_pairs)
        a = stack[xp.asarray(pair_i[start:stop])]
        b = stack_b[xp.asarray(pair_j[start:stop])]
        if common:
            result = best_line_pairs(a, b, xp)
        else:
            result = best_overlap_pairs(a, b, mask, xp)
        cc[start:stop], line_i[start:stop], line_j[start:stop] = (to_numpy(x) for x in result)
        return stop - start

    starts = range(0, num_pairs, batch_pairs)
    with tqdm(total=num_pairs, desc="common lines", unit="pair", mininterval=2.0,
              disable=None if progress else True) as bar, _single_threaded_blas(xp):
        if workers == 1:
            for start in starts:
                bar.update(batch(start))
        else:
            window = 64 * workers  # bounded number of pending batches
            with ThreadPoolExecutor(workers) as pool:
                for first in range(0, len(starts), window):
                    for done in pool.map(batch, starts[first:first + window]):
                        bar.update(done)
    return cc, line_i, line_j


@contextlib.contextmanager
def _single_threaded_blas(xp):
    if xp is not np:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
