"""The EMC 2D classification driver: frames sharded over MPI ranks, checkpoint and resume.

Each rank reads only its own frames of the replicate, holds every class model, and computes the
E-step on its frames a block at a time; the M-step partial sums are combined with Allreduce. The
initial models come from the global powder pattern (an Allreduce) and a seeded random pattern, so
the same seed gives the same result on any number of ranks, to floating-point tolerance.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from spiscape.backend import get_array_module, get_comm, to_numpy
from spiscape.emc import geometry, kernels
from spiscape.errors import ConfigError, InputError
from spiscape.io import count_frames, read_detector, read_photons, shard_bounds
from spiscape.utils.atomic import atomic_path

log = logging.getLogger(__name__)

LOG_COLUMNS = ("iteration", "seconds", "rms_change", "mutual_info", "log_likelihood", "beta")


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
        self.detector_path = str(detector_path)
        self.photon_files = photon_files
        self.detector = read_detector(detector_path)
        total = count_frames(photon_files)
        self.selection = replicate_frames(total, params.fraction, params.seed, params.replicate)
        if self.selection.size == 0:
            raise InputError(photon_files[0], "the replicate holds no frames")
        start, stop = shard_bounds(self.selection.size, self.rank, self.nranks)
        self.local_start = start
        self.frames = self.selection[start:stop]
        photons = read_photons(photon_files, frames=self.frames, num_pix=self.detector.num_pix)
        self._setup_geometry()
        self._setup_counts(photons)

    # -- set-up ------------------------------------------------------------------------------
    def _setup_geometry(self) -> None:
        det, p = self.detector, self.params
        # pixels merged into the model, those used in the likelihood (mask 0) first, so that the
        # used pixels of a dense block are a column slice (a view) rather than a copy
        used_pix = np.flatnonzero(det.mask == 0)
        if used_pix.size == 0:
            raise InputError(self.detector_path, "no pixel has mask 0 (used)")
        self.merge_pix = np.concatenate([used_pix, np.flatnonzero(det.mask == 1)])
        self.num_used = used_pix.size
        self.size = p.size or geometry.default_grid_size(det)
        self.angles = geometry.rotation_angles(p.num_rot, p.friedel)
        self.operator = self._grid_operator(1)
        # grid points that some merged pixel reaches at some rotation: where a model is measured
        reach = kernels.merge(
            self.xp.ones((1, p.num_rot, self.merge_pix.size), dtype=self.xp.float32),
            self.operator,
        )
        self.support = (to_numpy(reach)[0] > 1e-3).reshape(self.size, self.size)

    def _grid_operator(self, oversample: int):
        """The view operator onto a grid ``oversample`` times finer than the pixels (its side is
        ``oversample (S - 1) + 1``: every ``oversample``-th point is a point of the S x S grid)."""
        cx, cy = geometry.pixel_coords_2d(self.detector)
        fine = oversample * (self.size - 1) + 1
        table = geometry.rotation_table(oversample * cx[self.merge_pix],
                                        oversample * cy[self.merge_pix], self.angles, fine)
        return kernels.view_operator(table.index, table.weight, fine, self.xp)

    def _setup_counts(self, photons) -> None:
        csr = photons.to_csr().tocsc()[:, self.merge_pix].tocsr().astype(np.float32)
        self.counts = csr
        self.photons_used = np.asarray(csr[:, : self.num_used].sum(axis=1)).ravel()
        n_local = csr.shape[0]
        p = self.params
        mr = p.num_classes * p.num_rot
        if p.block_frames:
            self.block = int(p.block_frames)
        else:
            per_frame = mr * 8 * 4 + self.merge_pix.size * 4 * 2
            budget = self._memory_budget()
            self.block = int(max(1, min(max(n_local, 1), budget // per_frame)))
        # dense float32 blocks are rebuilt from the sparse counts every iteration unless they fit
        # in the cache budget, in which case they are built once (on the GPU when there is one)
        dense_bytes = n_local * self.merge_pix.size * 4
        self.dense_blocks = None
        if dense_bytes <= self._memory_budget() * 2:
            self.dense_blocks = [
                self.xp.asarray(csr[start : start + self.block].toarray())
                for start in range(0, n_local, self.block)
            ]
        log.debug("rank %d: %d frames, blocks of %d, dense cache %s", self.rank, n_local,
                  self.block, self.dense_blocks is not None)

    def _memory_budget(self) -> int:
        if self.xp is np:
            return 512 * 2**20
        free, _ = self.xp.cuda.runtime.memGetInfo()
        return int(free * 0.4)

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

    def initial_state(self) -> EMCState:
        """Rotationally averaged powder pattern times a seeded random pattern, one per class."""
        p, xp = self.params, self.xp
        powder = np.asarray(self.counts.sum(axis=0)).ravel().astype(np.float64)
        powder = to_numpy(self._allreduce(powder))
        n_total = self.selection.size
        spread = np.broadcast_to(powder / n_total, (1, p.num_rot, powder.size))
        ones = np.ones((1, p.num_rot, powder.size))
        num = to_numpy(kernels.merge(xp.asarray(spread.astype(np.float32)), self.operator))
        den = to_numpy(kernels.merge(xp.asarray(ones.astype(np.float32)), self.operator))
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
    def iterate(self, state: EMCState):
        """One EM iteration; returns the new state and this iteration's per-frame results."""
        p, xp = self.params, self.xp
        t0 = time.perf_counter()
        m, r, s = p.num_classes, p.num_rot, self.size
        models = xp.asarray(state.models.reshape(m, s * s).astype(np.float32))
        views = kernels.expand(models, self.operator, r)  # (M, R, P_merge)
        used = self.num_used
        views_used = views[:, :, :used]
        view_sums = views_used.sum(axis=2).reshape(m * r).astype(xp.float64)
        log_w = xp.ascontiguousarray(
            kernels.log_views(views_used, xp).reshape(m * r, -1).T.astype(xp.float32)
        )
        beta = kernels.beta_schedule(
            self.photons_used, state.iteration, p.beta_start, p.beta_jump, p.beta_period
        )
        n_local = self.counts.shape[0]
        numerator = xp.zeros((m * r, self.merge_pix.size), dtype=xp.float32)
        denominator = xp.zeros(m * r, dtype=xp.float64)
        occupancies = np.zeros((n_local, m), dtype=np.float32)
        best = np.zeros(n_local, dtype=np.int64)
        new_scale = state.scale.copy()
        log_likelihood = mutual_info = 0.0
        for number, start in enumerate(range(0, n_local, self.block)):
            stop = min(start + self.block, n_local)
            if self.dense_blocks is not None:
                dense = self.dense_blocks[number]
            else:
                dense = xp.asarray(self.counts[start:stop].toarray())
            result = kernels.e_step_block(
                dense[:, :used], dense, log_w, view_sums,
                xp.asarray(state.scale[start:stop]), xp.asarray(beta[start:stop]), xp,
                need_scaling=p.need_scaling,
            )
            numerator += result.numerator
            denominator += result.denominator
            occupancies[start:stop] = to_numpy(result.occupancies.reshape(-1, m, r).sum(axis=2))
            best[start:stop] = to_numpy(result.best)
            new_scale[start:stop] = to_numpy(result.new_scale)
            log_likelihood += result.log_likelihood
            mutual_info += result.mutual_info
        numerator = self._allreduce(numerator)
        denominator = self._allreduce(denominator)
        grid_num = kernels.merge(numerator.reshape(m, r, -1), self.operator)
        weights = xp.broadcast_to(
            denominator.reshape(m, r, 1).astype(xp.float32), (m, r, self.merge_pix.size)
        )
        grid_den = kernels.merge(xp.ascontiguousarray(weights), self.operator)
        old = state.models.reshape(m, s * s)
        covered = to_numpy(grid_den) > 1e-6 * float(to_numpy(grid_den).max())
        new = np.where(covered, to_numpy(grid_num) / np.maximum(to_numpy(grid_den), 1e-30), 0.0)
        dead = to_numpy(denominator).reshape(m, r).sum(axis=1) <= 1e-12
        new[dead] = old[dead]  # a class no frame chose keeps its model
        new = new.reshape(m, s, s)
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
            "mutual_info": self._sum(mutual_info) / n_total,
            "log_likelihood": self._sum(log_likelihood) / n_total,
            "beta": self._sum(beta.sum()) / n_total,
        }
        if reseeded and self.rank == 0:
            log.info("iteration %d: re-seeded %d starved classes", row["iteration"], reseeded)
        row["seconds"] = time.perf_counter() - t0
        new_state = EMCState(
            models=np.ascontiguousarray(new), scale=new_scale, iteration=state.iteration + 1,
            log_rows=[*state.log_rows, row],
        )
        # what sharpen() needs of this M-step: the per-rotation sums, the photons merged into
        # each grid point (its shrinkage) and the classes no frame chose
        sums = {"numerator": numerator, "denominator": denominator,
                "grid_photons": to_numpy(grid_num).reshape(m, s, s), "dead": dead}
        return new_state, {"occupancies": occupancies, "best": best, "sums": sums}

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
        ``sharpen_oversample`` times finer, back on the S x S grid (README, "Sharp averages").

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
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f["intens"] = state.models
            f["scale"] = scale
            f["iteration"] = state.iteration
            f.attrs["log"] = json.dumps(state.log_rows)
            f.attrs["params"] = json.dumps(self._fingerprint())

    def load_checkpoint(self, path: Path) -> EMCState:
        try:
            with h5py.File(path, "r") as f:
                models = f["intens"][:]
                scale = f["scale"][:]
                iteration = int(f["iteration"][()])
                log_rows = json.loads(f.attrs["log"])
                fingerprint = json.loads(f.attrs["params"])
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(
                path, f"unreadable checkpoint ({exc}); delete it to start afresh"
            ) from None
        if fingerprint != self._fingerprint():
            raise InputError(path, "checkpoint was made with other parameters or data; delete it "
                             "or run without --resume")
        start = self.local_start
        return EMCState(
            models=models, scale=scale[start : start + self.frames.size], iteration=iteration,
            log_rows=log_rows,
        )

    def _fingerprint(self) -> dict:
        keep = {k: v for k, v in asdict(self.params).items()
                if k not in ("iterations", "block_frames", "device")
                and not k.startswith("sharpen_")}
        return {**keep, "frames": int(self.selection.size), "size": self.size}

    def write_result(self, path: Path, state: EMCState, frame_results: dict) -> None:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        peak_per_rank = self.comm.gather(peak_mb, root=0) if self.nranks > 1 else [peak_mb]
        occupancies = self.gather_frames(frame_results["occupancies"])
        best = self.gather_frames(frame_results["best"])
        scale = self.gather_frames(state.scale)
        if self.rank != 0:
            return
        p = self.params
        table = np.array(
            [tuple(row[c] for c in LOG_COLUMNS) for row in state.log_rows],
            dtype=[(c, np.int32 if c == "iteration" else np.float64) for c in LOG_COLUMNS],
        )
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f["intens"] = frame_results["intens"]
            f["frames"] = self.selection
            f.create_dataset("occupancies", data=occupancies, compression="gzip")
            f["best_rotation"] = (best % p.num_rot).astype(np.int32)
            f["best_class"] = (best // p.num_rot).astype(np.int32)
            f["scale"] = scale
            f["log"] = table
            f["angles"] = self.angles
            f["model_pixels"] = self.merge_pix
            f["support"] = self.support
            f.attrs["params"] = json.dumps(asdict(p))
            f.attrs["photons"] = json.dumps([str(x) for x in self.photon_files])
            f.attrs["detector"] = self.detector_path
            f.attrs["size"] = self.size
            f.attrs["centre"] = (self.size - 1) / 2.0
            f.attrs["ranks"] = self.nranks
            # before the gather of the per-frame arrays, which only rank 0 pays for
            f.attrs["peak_memory_mb_per_rank"] = np.asarray(peak_per_rank)
            f.attrs["frames_per_rank"] = np.asarray(
                [np.subtract(*shard_bounds(self.selection.size, r, self.nranks)[::-1])
                 for r in range(self.nranks)]
            )

    def run(self, out: Path, checkpoint: Path | None = None, resume: bool = False) -> EMCState:
        p = self.params
        checkpoint = checkpoint or out.with_name(out.stem + ".ckpt.h5")
        if resume and checkpoint.exists():
            state = self.load_checkpoint(checkpoint)
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
        _, frame_results = self.iterate(state)
        t0 = time.perf_counter()
        frame_results["intens"] = self.sharpen(state, frame_results.pop("sums"))
        if self.rank == 0 and p.sharpen_iterations:
            log.info("sharpened the averages: %d EM steps on a grid %d times finer (%.2f s)",
                     p.sharpen_iterations, p.sharpen_oversample, time.perf_counter() - t0)
        self.write_result(out, state, frame_results)
        if self.rank == 0 and checkpoint.exists():
            checkpoint.unlink()
        return state
