"""The EMC 2D classification driver: frames sharded over MPI ranks, checkpoint and resume.

Each rank reads only its own frames of the replicate, holds every class model, and computes the
E-step on its frames a block at a time; the M-step partial sums are combined with Allreduce. The
initial models come from the global powder pattern (an Allreduce) and a seeded random pattern, so
the same seed gives the same result on any number of ranks, to floating-point tolerance.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from spiscape.backend import get_array_module, get_comm, to_numpy
from spiscape.emc import geometry, kernels
from spiscape.emc.frames import FrameStore, measure_crossover, pixel_chunks
from spiscape.errors import ConfigError, InputError
from spiscape.io import count_frames, read_detector, shard_bounds
from spiscape.io.checkpoint import read_checkpoint, write_checkpoint
from spiscape.io.photons import photon_files as list_photon_files
from spiscape.io.replicate import write_replicate
from spiscape.utils.atomic import check_output

log = logging.getLogger(__name__)

LOG_COLUMNS = ("iteration", "seconds", "rms_change", "mutual_info", "log_likelihood", "beta")
#: frames read at a time by the first pass over the data
SCAN_FRAMES = 4096
#: frames timed to find the photon density at which CSR beats dense products
CALIBRATION_FRAMES = 256
#: memory budget of a rank on a CPU when none is given (MB)
DEFAULT_MEMORY_MB = 1024


def default_threads() -> int:
    """Worker threads of a rank: OMP_NUM_THREADS when set (one rank per core group under MPI),
    else the cores this process may run on."""
    text = os.environ.get("OMP_NUM_THREADS", "")
    if text.isdigit() and int(text) > 0:
        return int(text)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def memory_budget(memory_mb: int | None, xp) -> int:
    """Bytes a rank may use for cached frames and views and the blocks in flight: ``memory_mb``,
    else 1 GiB on a CPU and 40 % of the free memory on a GPU."""
    if memory_mb:
        return int(memory_mb) * 2**20
    if xp is np:
        return DEFAULT_MEMORY_MB * 2**20
    free, _ = xp.cuda.runtime.memGetInfo()
    return int(free * 0.4)


def photon_fingerprint(photon_files) -> list:
    """Name, size and BLAKE2b hash of every photon file: a checkpoint resumes only on the same
    data (a file rewritten with the same number of frames is a different file)."""
    out = []
    for path in list_photon_files(photon_files):
        digest = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        out.append([str(Path(path).name), Path(path).stat().st_size, digest.hexdigest()])
    return out


@dataclass
class EMCParams:
    num_classes: int = 20
    num_rot: int = 24
    iterations: int = 30
    size: int | None = None
    friedel: bool = True
    need_scaling: bool = True
    beta_start: str | float = "auto"
    beta_jump: float = 2.0**0.5
    beta_period: int = 5
    seed: int = 1
    replicate: int = 0
    fraction: float = 1.0
    init_noise: float = 0.5
    sharpen_iterations: int = 0
    sharpen_oversample: int = 2
    sharpen_photons: float = 100.0
    reseed_share: float = 0.0
    block_frames: int | None = None
    device: str = "auto"
    threads: int | None = None
    memory_mb: int | None = None
    sparse_below: str | float = "auto"

    def check(self) -> None:
        problems = []
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1 (got {self.num_classes})")
        if self.num_rot < 1:
            problems.append(f"num_rot must be >= 1 (got {self.num_rot})")
        if self.iterations < 1:
            problems.append(f"iterations must be >= 1 (got {self.iterations})")
        if not 0 < self.fraction <= 1:
            problems.append(f"fraction must be in (0, 1] (got {self.fraction})")
        if self.beta_jump < 1:
            problems.append(f"beta_jump must be >= 1 (got {self.beta_jump})")
        if self.beta_start != "auto" and not 0 < float(self.beta_start) <= 1:
            problems.append(f"beta_start must be 'auto' or in (0, 1] (got {self.beta_start})")
        if self.sharpen_iterations < 0:
            problems.append(f"sharpen_iterations must be >= 0 (got {self.sharpen_iterations})")
        if self.sharpen_oversample < 1:
            problems.append(f"sharpen_oversample must be >= 1 (got {self.sharpen_oversample})")
        if not self.sharpen_photons >= 0:
            problems.append(f"sharpen_photons must be >= 0 (got {self.sharpen_photons})")
        if not 0 <= self.reseed_share < 1:
            problems.append(f"reseed_share must be in [0, 1) (got {self.reseed_share})")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be >= 1 (got {self.threads})")
        if self.memory_mb is not None and self.memory_mb < 1:
            problems.append(f"memory_mb must be >= 1 (got {self.memory_mb})")
        if self.sparse_below != "auto" and not 0 <= float(self.sparse_below) <= 1:
            problems.append(f"sparse_below must be 'auto' or in [0, 1] (got {self.sparse_below})")
        if self.size is not None and self.size < 5:
            problems.append(f"size must be >= 5 (got {self.size})")
        if problems:
            raise ConfigError("; ".join(problems))


def replicate_frames(num_frames: int, fraction: float, seed: int, replicate: int) -> np.ndarray:
    """Sorted global indices of the frames in a bootstrap replicate (all frames at fraction 1)."""
    if fraction >= 1.0:
        return np.arange(num_frames, dtype=np.int64)
    rng = np.random.default_rng([seed, replicate, 7919])
    count = max(1, int(round(fraction * num_frames)))
    return np.sort(rng.choice(num_frames, size=count, replace=False)).astype(np.int64)


@dataclass
class EMCState:
    models: np.ndarray  # (M, S, S) host copy
    scale: np.ndarray  # (n_local,) φ_d
    iteration: int = 0  # iterations completed
    log_rows: list = field(default_factory=list)


class EMC2D:
    """One replicate of EMC 2D classification on this rank's shard."""

    def __init__(self, photon_files, detector_path, params: EMCParams, comm=None):
        params.check()
        self.params = params
        self.comm = comm or get_comm()
        self.rank, self.nranks = self.comm.Get_rank(), self.comm.Get_size()
        self.xp = get_array_module(params.device)
        self.threads = 1 if self.xp is not np else (params.threads or default_threads())
        self.budget = memory_budget(params.memory_mb, self.xp)
        self.detector_path = str(detector_path)
        self.photon_files = photon_files
        self.detector = read_detector(detector_path)
        total = count_frames(photon_files)
        selection = replicate_frames(total, params.fraction, params.seed, params.replicate)
        start, stop = shard_bounds(selection.size, self.rank, self.nranks)
        det = self.detector
        used_pix = np.flatnonzero(det.mask == 0)
        if used_pix.size == 0:
            raise InputError(self.detector_path, "no pixel has mask 0 (used)")
        pixels = np.concatenate([used_pix, np.flatnonzero(det.mask == 1)])
        self.store = FrameStore(photon_files, selection[start:stop], det.num_pix, pixels,
                                det.mask[pixels] == 0, block=SCAN_FRAMES, xp=self.xp)
        self._gather_selection(selection.size)
        self._arrange()
        self._setup_geometry()

    # -- set-up ------------------------------------------------------------------------------
    def _gather_selection(self, drawn: int) -> None:
        """The replicate's frames that hold photons, over all ranks, in order."""
        self.frames = self.store.frames
        parts = self.comm.allgather(self.frames)
        self.selection = np.concatenate(parts).astype(np.int64)
        self.local_start = int(sum(part.size for part in parts[: self.rank]))
        self.frames_per_rank = [int(part.size) for part in parts]
        empty = np.concatenate(self.comm.allgather(self.store.empty_frames))
        self.empty_frames = empty.astype(np.int64)
        if self.selection.size == 0:
            raise InputError(self.photon_files[0], f"none of the {drawn} frames of the replicate "
                             "has a photon on a used pixel")
        if empty.size and self.rank == 0:
            shown = ", ".join(str(int(f)) for f in empty[:10]) + (" ..." if empty.size > 10 else "")
            log.warning("%d of %d frames have no photon on a used pixel and are left out "
                        "(frames %s)", empty.size, drawn, shown)

    def _arrange(self, crossover: float | None = None) -> None:
        """Pixel order by photon density (the same on every rank), the dense/sparse split (at
        ``crossover``, else from the parameters), the block size and the chunks, from the memory
        budget (see :mod:`spiscape.emc.frames`)."""
        p, store = self.params, self.store
        n_total = self.selection.size
        density = to_numpy(self._allreduce(store.pixel_frames)) / n_total
        order = np.lexsort((np.arange(density.size), -density))
        self.powder = to_numpy(self._allreduce(store.powder))[order]  # the engine's pixel order
        views = p.num_classes * p.num_rot
        if crossover is None and p.sparse_below == "auto":
            if self.rank == 0:
                with self._blas_threads(1):
                    crossover = measure_crossover(store.sample(CALIBRATION_FRAMES), views, self.xp)
            crossover = self.comm.bcast(crossover, root=0)
        elif crossover is None:
            crossover = float(p.sparse_below)
        self.crossover = crossover
        num_dense = int(np.sum(density[order] >= crossover)) if crossover < 1 else 0
        # per thread: a block's log R, P and temporaries (4 x b x R M float32) and its dense
        # photons; per chunk: its views and numerator (chunk x R M float32, twice)
        work = self.budget // (4 * self.threads)
        per_frame = 16 * views + 4 * num_dense
        block = p.block_frames or max(16, min(work // per_frame,
                                              -(-store.num_frames // (2 * self.threads))))
        chunk = max(64, self.budget // (8 * self.threads * 8 * views))
        store.block = int(max(1, block))
        chunks = pixel_chunks(num_dense, density.size, int(chunk))
        store.arrange(order, num_dense, chunks, cache_bytes=self.budget // 4)
        self.chunks = chunks
        self.num_dense = num_dense
        self.cache_views = density.size * views * 4 <= self.budget // 4
        if self.rank == 0:
            log.info("E/M-step: %d of %d pixels dense (photon density >= %.3f), the rest CSR; "
                     "blocks of %d frames, %d pixel chunk(s), %d thread(s); frames %s, views %s",
                     num_dense, density.size, crossover, store.block, len(chunks), self.threads,
                     "cached" if store.cached else "streamed from the photon files",
                     "cached" if self.cache_views else "recomputed per block")

    def _setup_geometry(self) -> None:
        det, p, xp = self.detector, self.params, self.xp
        self.merge_pix = self.store.pixels  # the engine's pixel order
        self.used_mask = self.store.used
        self.num_used = int(self.used_mask.sum())
        self.size = p.size or geometry.default_grid_size(det)
        self.angles = geometry.rotation_angles(p.num_rot, p.friedel)
        cx, cy = geometry.pixel_coords_2d(det)
        table = geometry.rotation_table(cx[self.merge_pix], cy[self.merge_pix], self.angles,
                                        self.size)
        operator = kernels.pixel_major_operator(table.index, table.weight, self.size)
        r = p.num_rot
        self.view_ops, self.merge_ops = [], []
        for chunk in self.chunks:
            rows = operator[chunk.start * r : chunk.stop * r]
            self.view_ops.append(kernels.view_operator_on(rows, xp))
            self.merge_ops.append(kernels.view_operator_on(rows.T.tocsr(), xp))
        # Σ_t over used pixels of each rotation's interpolation weights (view sums) and over all
        # merged pixels (the M-step's denominator and where a model is measured)
        self.used_sums = kernels.rotation_sums(operator, r, self.used_mask, xp)
        self.all_sums = kernels.rotation_sums(operator, r, np.ones(self.merge_pix.size), xp)
        self.support = (to_numpy(self.all_sums).sum(axis=0) > 1e-3).reshape(self.size, self.size)
        self._host_operator = operator

    def _grid_operator(self, oversample: int):
        """The view operator onto a grid ``oversample`` times finer than the pixels (its side is
        ``oversample (S - 1) + 1``: every ``oversample``-th point is a point of the S x S grid),
        rotation-major (rows ``r·P + t``) as :func:`kernels.expand` and ``merge`` take it."""
        cx, cy = geometry.pixel_coords_2d(self.detector)
        fine = oversample * (self.size - 1) + 1
        table = geometry.rotation_table(oversample * cx[self.merge_pix],
                                        oversample * cy[self.merge_pix], self.angles, fine)
        return kernels.view_operator(table.index, table.weight, fine, self.xp)

    def _blas_threads(self, count: int):
        """Limit BLAS to ``count`` threads (a no-op context on a GPU)."""
        if self.xp is not np:
            return contextlib.nullcontext()
        return threadpool_limits(limits=count, user_api="blas")

    def _allreduce(self, array):
        """Sum a host or device array over ranks (through host memory: no CUDA-aware MPI needed)."""
        host = np.ascontiguousarray(to_numpy(array))
        if self.nranks > 1:
            out = np.empty_like(host)
            self.comm.Allreduce(host, out)
            host = out
        return self.xp.asarray(host) if self.xp is not np else host

    def _sum(self, value: float) -> float:
        return float(self.comm.allreduce(float(value))) if self.nranks > 1 else float(value)

    @property
    def photons_used(self) -> np.ndarray:
        return self.store.photons_used

    def initial_state(self) -> EMCState:
        """Rotationally averaged powder pattern times a seeded random pattern, one per class."""
        p = self.params
        n_total = self.selection.size
        spread = np.repeat(self.powder / n_total, p.num_rot).astype(np.float32)
        num = spread @ self._host_operator
        den = to_numpy(self.all_sums).sum(axis=0)
        base = np.where(den > 1e-6, num / np.maximum(den, 1e-6), 0.0).reshape(self.size, self.size)
        rng = np.random.default_rng([p.seed, p.replicate])
        noise = rng.uniform(-1.0, 1.0, size=(p.num_classes, self.size, self.size))
        models = base[None] * (1.0 + p.init_noise * noise)
        if p.friedel:
            models = geometry.friedel_symmetrize(models)
        mean_photons = self._sum(self.photons_used.sum()) / n_total
        if p.need_scaling:
            scale = self.photons_used / max(mean_photons, 1e-12)
        else:
            scale = np.ones_like(self.photons_used)
        return EMCState(models=np.ascontiguousarray(models), scale=scale.astype(np.float64))

    # -- one iteration -------------------------------------------------------------------------
    def _log_view_chunk(self, i: int, models_t, floor: float):
        """log W on pixel chunk i (chunk × R·M), zero on pixels not used in the likelihood."""
        xp, chunk = self.xp, self.chunks[i]
        views = self.view_ops[i] @ models_t  # (chunk·R, M)
        log_w = xp.log(xp.maximum(views, floor)).reshape(chunk.stop - chunk.start, -1)
        unused = ~self.used_mask[chunk.start : chunk.stop]
        if unused.any():
            log_w[xp.asarray(unused)] = 0
        return log_w.astype(xp.float32, copy=False)

    def _block(self, block, ctx, acc) -> None:
        """E-step of one block of frames and its M-step partial sums, added to ``acc``."""
        xp, p = self.xp, self.params
        m, r = p.num_classes, p.num_rot
        lo, hi = block.start, block.stop
        scale = xp.asarray(ctx["scale"][lo:hi].astype(np.float32))
        # one pixel chunk at a time: with the views not cached, only one chunk's log-views and
        # one chunk's numerator exist at once (the memory budget), whatever the pixel count
        log_views = ctx["log_views"] or (self._log_view_chunk(i, ctx["models_t"], ctx["floor"])
                                         for i in range(len(self.chunks)))
        log_r = kernels.block_log_likelihood(block.parts, log_views, ctx["view_sums"], scale, xp)
        prob, logsum, mutual_info = kernels.responsibilities(
            log_r, xp.asarray(ctx["beta"][lo:hi]), xp)
        prob_sparse = kernels.sparse_probabilities(prob, xp)
        for i in range(len(self.chunks)):
            num = kernels.chunk_numerator(block.parts_t[i], prob, xp, prob_sparse)
            acc["grid_num"] += kernels.merge_numerators([num], [self.merge_ops[i]],
                                                        m).astype(xp.float64)
            if ctx["collect"]:
                acc["numerator"][i] += num
            del num
        acc["denominator"] += (prob.T @ scale).astype(xp.float64)
        ctx["occupancies"][lo:hi] = to_numpy(prob.reshape(-1, r, m).sum(axis=1))
        ctx["best"][lo:hi] = to_numpy(prob.argmax(axis=1))
        if p.need_scaling:
            expected = to_numpy(prob @ ctx["view_sums"].astype(prob.dtype)).astype(np.float64)
            photons = self.photons_used[lo:hi]
            ctx["new_scale"][lo:hi] = np.where(expected > 0, photons / np.maximum(expected, 1e-300),
                                               ctx["scale"][lo:hi])
        acc["log_likelihood"] += float((logsum - np.log(log_r.shape[1])).sum())
        acc["mutual_info"] += float(mutual_info.sum())

    def _accumulator(self, collect: bool) -> dict:
        xp, p = self.xp, self.params
        views = p.num_classes * p.num_rot
        acc = {"grid_num": xp.zeros((self.size * self.size, p.num_classes), dtype=xp.float64),
               "denominator": xp.zeros(views, dtype=xp.float64),
               "log_likelihood": 0.0, "mutual_info": 0.0}
        if collect:
            acc["numerator"] = [xp.zeros((c.stop - c.start, views), dtype=xp.float32)
                                for c in self.chunks]
        return acc

    def _run_blocks(self, ctx) -> dict:
        """Every block through :meth:`_block`, on ``threads`` worker threads (each with one BLAS
        thread and its own partial sums) or in this thread on a GPU. Thread i takes blocks i,
        i + T, i + 2T, ...: a fixed order of the sums, so the same thread count gives the same
        result to the last bit."""
        starts = list(self.store.starts())

        def work(first, acc):
            for start in starts[first :: self.threads]:
                self._block(self.store.block_at(start), ctx, acc)
            return acc

        if self.threads == 1:
            return work(0, self._accumulator(ctx["collect"]))
        with self._blas_threads(1), ThreadPoolExecutor(self.threads) as pool:
            accs = [f.result() for f in [pool.submit(work, i, self._accumulator(ctx["collect"]))
                                         for i in range(self.threads)]]
        total = accs[0]
        for acc in accs[1:]:
            for key, value in acc.items():
                if key == "numerator":
                    for i, part in enumerate(value):
                        total[key][i] += part
                else:
                    total[key] += value
        return total

    def iterate(self, state: EMCState, collect: bool = False):
        """One EM iteration; returns the new state and this iteration's per-frame results (with
        ``collect``, also the per-view photon sums that :meth:`sharpen` needs)."""
        p, xp = self.params, self.xp
        t0 = time.perf_counter()
        m, r, s = p.num_classes, p.num_rot, self.size
        models_t = xp.asarray(np.ascontiguousarray(state.models.reshape(m, s * s).T,
                                                   dtype=np.float32))
        view_sums = (self.used_sums @ models_t).reshape(r * m).astype(xp.float64)
        floor = (kernels.LOG_FLOOR * float(view_sums.sum()) / (self.num_used * r * m)
                 + float(np.finfo(np.float32).tiny))
        n_local = self.store.num_frames
        ctx = {
            "models_t": models_t, "floor": floor, "view_sums": view_sums, "collect": collect,
            "log_views": ([self._log_view_chunk(i, models_t, floor)
                           for i in range(len(self.chunks))] if self.cache_views else None),
            "scale": state.scale,
            "beta": kernels.beta_schedule(self.photons_used, state.iteration, p.beta_start,
                                          p.beta_jump, p.beta_period),
            "occupancies": np.zeros((n_local, m), dtype=np.float32),
            "best": np.zeros(n_local, dtype=np.int64),
            "new_scale": state.scale.copy(),
        }
        acc = self._run_blocks(ctx)
        ctx.pop("log_views")
        grid_num = to_numpy(self._allreduce(acc["grid_num"])).T  # (M, S²)
        denominator = to_numpy(self._allreduce(acc["denominator"])).reshape(r, m)
        grid_den = denominator.T @ to_numpy(self.all_sums)  # (M, S²)
        old = state.models.reshape(m, s * s)
        covered = grid_den > 1e-6 * float(grid_den.max())
        new = np.where(covered, grid_num / np.maximum(grid_den, 1e-30), 0.0)
        dead = denominator.sum(axis=0) <= 1e-12
        new[dead] = old[dead]  # a class no frame chose keeps its model
        new = new.reshape(m, s, s)
        occupancies, beta, new_scale = ctx["occupancies"], ctx["beta"], ctx["new_scale"]
        class_frames = to_numpy(self._allreduce(occupancies.sum(axis=0).astype(np.float64)))
        reseeded = self.reseed(new, class_frames, state.iteration + 1)
        if p.friedel:
            new = geometry.friedel_symmetrize(new)
        if p.need_scaling:
            mean_scale = self._sum(new_scale.sum()) / self.selection.size
            new *= mean_scale
            new_scale /= mean_scale
        rms = float(np.sqrt(np.mean((new - state.models) ** 2)))
        rms /= max(float(np.sqrt(np.mean(state.models**2))), 1e-30)
        n_total = self.selection.size
        row = {
            "iteration": state.iteration + 1,
            "seconds": 0.0,
            "rms_change": rms,
            "mutual_info": self._sum(acc["mutual_info"]) / n_total,
            "log_likelihood": self._sum(acc["log_likelihood"]) / n_total,
            "beta": self._sum(beta.sum()) / n_total,
        }
        if reseeded and self.rank == 0:
            log.info("iteration %d: re-seeded %d starved classes", row["iteration"], reseeded)
        row["seconds"] = time.perf_counter() - t0
        new_state = EMCState(
            models=np.ascontiguousarray(new), scale=new_scale, iteration=state.iteration + 1,
            log_rows=[*state.log_rows, row],
        )
        best = ctx["best"]  # view index r·M + m
        frame_results = {"occupancies": occupancies, "best_class": best % m,
                         "best_rotation": best // m}
        if collect:
            # what sharpen() needs of this M-step, class-major as kernels.ml_update takes it:
            # the per-view photon sums (M, R, P), the per-view scale sums (M·R), the photons
            # merged into each grid point (its shrinkage) and the classes no frame chose
            numerator = xp.concatenate(acc["numerator"], axis=0).reshape(-1, r, m)
            numerator = self._allreduce(xp.ascontiguousarray(numerator.transpose(2, 1, 0)))
            frame_results["sums"] = {
                "numerator": numerator, "denominator": xp.asarray(denominator.T.ravel()),
                "grid_photons": grid_num.reshape(m, s, s), "dead": dead}
        return new_state, frame_results

    def reseed_due(self, iteration: int) -> bool:
        """Re-seeding happens just before each jump of beta, never in the last two beta levels
        (those iterations converge the classes as they are)."""
        p = self.params
        return (p.reseed_share > 0 and iteration % p.beta_period == 0
                and iteration <= p.iterations - 2 * p.beta_period)

    def reseed(self, models: np.ndarray, class_frames: np.ndarray, iteration: int) -> int:
        """Give starved classes a second chance, in place: a class holding fewer than
        ``reseed_share`` of its fair share of the frames (N / M) takes over a copy of the most
        populated class with a small seeded perturbation, so that EM can split that class.

        Why: under annealing a few classes (often a blurred one, e.g. spheres of mixed sizes)
        win most frames early and the rest starve; on data unlike the demo half of the classes
        ended with < 3 frames, and the melting continuum was left with a handful of averages.
        Returns how many classes were re-seeded (the same on every rank: the frame counts are
        all-reduced and the perturbation is seeded by iteration)."""
        if not self.reseed_due(iteration):
            return 0
        p = self.params
        fair = self.selection.size / p.num_classes
        starved = np.flatnonzero(class_frames < p.reseed_share * fair)
        if starved.size == 0 or starved.size == p.num_classes:
            return 0
        frames = class_frames.astype(np.float64).copy()
        rng = np.random.default_rng([p.seed, p.replicate, iteration])
        done = 0
        for c in starved:
            donor = int(np.argmax(frames))
            if frames[donor] < 2 * p.reseed_share * fair:
                break  # nothing left that is worth splitting
            noise = rng.standard_normal(models.shape[1:])
            models[c] = models[donor] * np.exp(0.1 * noise)
            frames[donor] /= 2  # the next starved class splits the next largest
            frames[c] = frames[donor]
            done += 1
        return done

    def sharpen(self, state: EMCState, sums: dict) -> np.ndarray:
        """The class averages written out: the exact M-step of the final probabilities on a grid
        ``sharpen_oversample`` times finer, back on the S x S grid (docs/methods.md, "Sharp
        averages").

        The iterations' merge spreads every photon over the four grid points around it, which
        blurs a model by about half a pixel: harmless for the classification, but at a steep
        fall-off (a cube's central speckle) the average reads 10 % low and 30 % high in
        successive rings. With the probabilities of the last E-step fixed, ``sharpen_iterations``
        multiplicative EM steps (:func:`kernels.ml_update`) make the views of the model match the
        photons themselves, and the finer grid keeps the bilinear views close to the pattern
        between the pixels. Starts from the last model interpolated onto the fine grid.

        Deblurring amplifies noise where few photons land (there the ML model is mostly zeros and
        a few spikes, and its ring means fall), so each grid point keeps the fraction
        ``C / (C + sharpen_photons)`` of the change, ``C`` the photons merged into it: a
        Wiener-like shrinkage towards the merge that deblurs the bright low-q speckle fully
        (thousands of photons a point on the demo) and leaves the faint high q (a few) as merged.
        ``sharpen_photons`` 0 keeps the ML model everywhere.
        """
        import scipy.ndimage

        p, xp = self.params, self.xp
        if p.sharpen_iterations == 0:
            return state.models
        m, r, step = p.num_classes, p.num_rot, p.sharpen_oversample
        operator = self._grid_operator(step) if step > 1 else self.operator
        fine = step * (self.size - 1) + 1
        start = scipy.ndimage.zoom(state.models, (1, fine / self.size, fine / self.size), order=1,
                                   grid_mode=False) if step > 1 else state.models
        assert start.shape == (m, fine, fine), start.shape
        models = xp.asarray(np.maximum(start, 0).reshape(m, -1).astype(np.float32))
        weights = xp.broadcast_to(
            sums["denominator"].reshape(m, r, 1).astype(xp.float32), (m, r, self.merge_pix.size)
        )
        grid_den = kernels.merge(xp.ascontiguousarray(weights), operator)
        new = kernels.ml_update(models, kernels.expand(models, operator, r),
                                sums["numerator"].reshape(m, r, -1), grid_den, operator,
                                p.sharpen_iterations, xp)
        grid_den = to_numpy(grid_den)
        new = np.where(grid_den > 1e-6 * float(grid_den.max()), to_numpy(new), 0.0)
        new = new.reshape(m, fine, fine)[:, ::step, ::step]
        new[sums["dead"]] = state.models[sums["dead"]]
        if p.sharpen_photons > 0:
            photons = sums["grid_photons"]
            new = state.models + photons / (photons + p.sharpen_photons) * (new - state.models)
        if p.friedel:
            new = geometry.friedel_symmetrize(new)
        return np.ascontiguousarray(new)

    # -- gathering and files -------------------------------------------------------------------
    def gather_frames(self, local: np.ndarray):
        """Concatenate a per-frame array over ranks on rank 0 (None elsewhere)."""
        if self.nranks == 1:
            return local
        parts = self.comm.gather(local, root=0)
        return np.concatenate(parts) if self.rank == 0 else None

    def save_checkpoint(self, path: Path, state: EMCState) -> None:
        scale = self.gather_frames(state.scale)
        if self.rank != 0:
            return
        write_checkpoint(path, state.models, scale, state.iteration, state.log_rows,
                         self._fingerprint(), {"sparse_below": self.crossover})

    def load_checkpoint(self, path: Path) -> EMCState:
        saved = read_checkpoint(path, self._fingerprint())
        start = self.local_start
        return EMCState(models=saved["intens"],
                        scale=saved["scale"][start:start + self.frames.size],
                        iteration=saved["iteration"], log_rows=saved["log_rows"])

    def _resume_split(self, checkpoint: Path) -> None:
        """With ``sparse_below: auto``, take the dense/CSR split the checkpointed run measured, so
        that a resumed run sums in the same order as an unbroken one."""
        if self.params.sparse_below != "auto":
            return
        crossover = None
        if self.rank == 0:
            with h5py.File(checkpoint, "r") as f:
                crossover = f.attrs.get("sparse_below")
        crossover = self.comm.bcast(None if crossover is None else float(crossover), root=0)
        if crossover is not None and crossover != self.crossover:
            self._arrange(crossover)
            self._setup_geometry()

    def _fingerprint(self) -> dict:
        """What a checkpoint must agree on to be resumed: the parameters that change the result
        (not iterations, how the work is split, or the final sharpening), the frames and the
        photon files' contents."""
        keep = {k: v for k, v in asdict(self.params).items()
                if k not in ("iterations", "block_frames", "device", "threads", "memory_mb",
                             "sparse_below")
                and not k.startswith("sharpen_")}
        if not hasattr(self, "_photons_hash"):
            self._photons_hash = (photon_fingerprint(self.photon_files) if self.rank == 0
                                  else None)
            self._photons_hash = self.comm.bcast(self._photons_hash, root=0)
        return {**keep, "frames": int(self.selection.size), "size": self.size,
                "photons": self._photons_hash}

    def write_result(self, path: Path, state: EMCState, frame_results: dict) -> None:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        peak_per_rank = self.comm.gather(peak_mb, root=0) if self.nranks > 1 else [peak_mb]
        occupancies = self.gather_frames(frame_results["occupancies"])
        best_class = self.gather_frames(frame_results["best_class"])
        best_rotation = self.gather_frames(frame_results["best_rotation"])
        scale = self.gather_frames(state.scale)
        if self.rank != 0:
            return
        p = self.params
        table = np.array(
            [tuple(row[c] for c in LOG_COLUMNS) for row in state.log_rows],
            dtype=[(c, np.int32 if c == "iteration" else np.float64) for c in LOG_COLUMNS],
        )
        datasets = {
            "intens": frame_results["intens"], "frames": self.selection,
            "occupancies": occupancies, "best_rotation": best_rotation.astype(np.int32),
            "best_class": best_class.astype(np.int32), "scale": scale, "log": table,
            "angles": self.angles, "model_pixels": self.merge_pix, "support": self.support,
            "empty_frames": self.empty_frames,
        }
        attrs = {
            "params": json.dumps(asdict(p)),
            "photons": json.dumps([str(x) for x in self.photon_files]),
            "detector": self.detector_path, "size": self.size, "centre": (self.size - 1) / 2.0,
            "ranks": self.nranks,
            # before the gather of the per-frame arrays, which only rank 0 pays for
            "peak_memory_mb_per_rank": np.asarray(peak_per_rank),
            "frames_per_rank": np.asarray(self.frames_per_rank),
            "dense_pixels": self.num_dense, "sparse_below": self.crossover,
            "threads_per_rank": self.threads,
        }
        write_replicate(path, datasets, attrs)

    def run(self, out: Path, checkpoint: Path | None = None, resume: bool = False) -> EMCState:
        p = self.params
        out = check_output(out)
        checkpoint = check_output(checkpoint or out.with_name(out.stem + ".ckpt.h5"))
        if resume and checkpoint.exists():
            state = self.load_checkpoint(checkpoint)
            self._resume_split(checkpoint)
            log.info("resuming from %s after iteration %d", checkpoint, state.iteration)
        else:
            state = self.initial_state()
        if self.rank == 0:
            log.info(
                "EMC 2D: %d frames on %d rank(s), %d classes x %d rotations, %d x %d grid, %s",
                self.selection.size, self.nranks, p.num_classes, p.num_rot, self.size, self.size,
                "GPU" if self.xp is not np else "CPU",
            )
        bar = tqdm(total=p.iterations, initial=min(state.iteration, p.iterations), unit="iter",
                   desc=f"classify2d rep{p.replicate}", disable=None if self.rank == 0 else True)
        with bar:
            while state.iteration < p.iterations:
                state, _ = self.iterate(state)
                row = state.log_rows[-1]
                if self.rank == 0:
                    log.info(
                        "iter %3d  %6.2f s  rms %.3e  MI %.3f  logL/frame %.4e  beta %.4f",
                        row["iteration"], row["seconds"], row["rms_change"], row["mutual_info"],
                        row["log_likelihood"], row["beta"],
                    )
                self.save_checkpoint(checkpoint, state)
                bar.update(1)
        # per-frame occupancies, best rotations and scales under the final models
        _, frame_results = self.iterate(state, collect=p.sharpen_iterations > 0)
        t0 = time.perf_counter()
        frame_results["intens"] = self.sharpen(state, frame_results.pop("sums", None))
        if self.rank == 0 and p.sharpen_iterations:
            log.info("sharpened the averages: %d EM steps on a grid %d times finer (%.2f s)",
                     p.sharpen_iterations, p.sharpen_oversample, time.perf_counter() - t0)
        self.write_result(out, state, frame_results)
        if self.rank == 0 and checkpoint.exists():
            checkpoint.unlink()
        return state
