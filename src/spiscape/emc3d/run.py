"""Multi-model 3D EMC: K 3D intensity models straight from the frames (``spiscape emc3d``).

Each frame d is explained by one of K models at one of Q orientations (the refined 600-cell,
:mod:`.quaternions`), with a scale φ_d. In Dragonfly's notation, for the view j = (o, k) of
model k at orientation o on the used pixels t (:mod:`.slicing`):

    R_dj = Σ_t K_dt log W_tj − φ_d Σ_t W_tj + log w_o,
    P_dj ∝ exp(β_d (R_dj − max_j R_dj)),

with W_tj = c_t M_k(R_o q_t) (c_t the pixel's solid angle × polarisation), w_o the orientation's
share of SO(3) and β_d annealed as in ``classify2d`` (:func:`spiscape.emc.kernels.beta_schedule`),
from one start for every frame by default (1/√ of the mean count; ``classify2d``'s per-frame 1/√N_d
is ``beta_start="auto"``). The M-step merges Σ_d P_dj K_dt and c_t Σ_d P_dj φ_d onto the grid with
the transpose of the slice and divides, after symmetrising both (Friedel's law, and the point group
when one is given); the scale is φ_d = N_d / Σ_j P_dj Σ_t W_tj (with ``need_scaling``). Frames are
sharded over MPI ranks (the merged sums are Allreduced), read once, and processed in blocks whose
size follows the memory budget; the views of all orientations are kept between the E- and M-step
when they fit the budget, else sliced again per block. NumPy on a CPU, CuPy on a GPU through the
array module (the operators as SciPy / cupyx CSR).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from spiscape.backend import get_array_module, get_comm, to_numpy
from spiscape.emc import kernels
from spiscape.emc.run import memory_budget, photon_fingerprint
from spiscape.emc3d import quaternions, slicing
from spiscape.errors import ConfigError, InputError
from spiscape.io.checkpoint import read_checkpoint, write_checkpoint
from spiscape.orient import rotations
from spiscape.phasing.align import centred_radius

log = logging.getLogger(__name__)


#: ``spiscape emc3d --refine-cubic`` refines a model with m-3m when symmetrising keeps at least
#: this share of its anisotropic log-intensity power (:func:`slicing.anisotropic_share`): the
#: cube models 0.78 (demo) and 0.67 (df80contam), their spheres, dimers and rods 0.10-0.40
CUBIC_SHARE = 0.5
#: M-step rules (see EMC3D.iterate)
MERGES = ("tomograms", "photons")
#: with merge "tomograms", an orientation's tomogram enters the model when some frame's annealed
#: probability there is at least exp(-TOMOGRAM_REACH) of its largest (Dragonfly keeps the same)
TOMOGRAM_REACH = 14.0


@dataclass
class EMC3DParams:
    num_models: int = 2
    num_div: int = 4
    iterations: int = 30
    point_group: str = "1"
    beta_start: float | str = "mean"  # 1/sqrt(mean photons), every frame alike (see EMC3D)
    beta_jump: float = 2.0
    beta_period: int = 3
    need_scaling: bool = True
    seed: int = 0
    init_noise: float = 0.1
    label_iterations: int = 5  # with initial labels: iterations that hold frames to them
    warmup: int = 10  # with a point group: iterations without it first (see EMC3D.run)
    block_frames: int | None = None
    memory_mb: int | None = None
    device: str = "auto"
    held_out: float = 0.0  # share of frames left out of the fit and scored at the end
    merge: str = "tomograms"  # M-step: "tomograms" (EMC's compress) or "photons" (see iterate)

    def check(self) -> None:
        if self.num_models < 1:
            raise ConfigError(f"emc3d num_models must be >= 1, got {self.num_models}")
        if self.iterations < 1:
            raise ConfigError(f"emc3d iterations must be >= 1, got {self.iterations}")
        if self.point_group not in rotations.POINT_GROUPS:
            raise ConfigError(f"emc3d point_group {self.point_group!r} unknown (known: "
                              f"{', '.join(rotations.POINT_GROUPS)})")
        if self.point_group not in ("1", "-1") and not 0 <= self.warmup < self.iterations:
            raise ConfigError(f"emc3d warmup must be in [0, iterations), got {self.warmup}")
        if not 0 <= self.held_out < 0.5:
            raise ConfigError(f"emc3d held_out must be in [0, 0.5), got {self.held_out}")
        if not 0 <= self.init_noise < 1:
            raise ConfigError(f"emc3d init_noise must be in [0, 1), got {self.init_noise}")
        if self.merge not in MERGES:
            raise ConfigError(f"emc3d merge must be one of {', '.join(MERGES)}, got "
                              f"{self.merge!r}")


@dataclass
class EMC3DState:
    models: np.ndarray  # (K, V, V, V)
    scale: np.ndarray  # (n_local,)
    iteration: int = 0
    log_rows: list = field(default_factory=list)


class EMC3D:
    """One 3D EMC reconstruction over this rank's shard of the frames."""

    def __init__(self, photon_files, detector_path, params: EMC3DParams, comm=None,
                 labels=None, select=None, start=None):
        from spiscape.io import read_detector, read_shard

        params.check()
        self.params = params
        self.comm = comm or get_comm()
        self.rank, self.nranks = self.comm.Get_rank(), self.comm.Get_size()
        self.xp = get_array_module(params.device)
        self.photon_files = [Path(p) for p in photon_files]
        self.detector_path = Path(detector_path)
        det = read_detector(detector_path)
        self.used = np.flatnonzero(det.mask == 0)
        if self.used.size == 0:
            raise InputError(detector_path, "the detector has no used pixel (mask 0)")
        self.q = np.stack([det.qx, det.qy, det.qz]).astype(np.float64)[:, self.used]
        # solid angle x polarisation of each pixel: the view is corr_t M(R q_t)
        self.corr = np.asarray(det.corr, dtype=np.float64)[self.used]
        self.size = slicing.grid_size(self.q)
        photons, self.local_start = read_shard(self.photon_files, self.rank, self.nranks,
                                               num_pix=det.num_pix)
        counts = photons.to_csr()[:, self.used].astype(np.float32).tocsr()
        self.photons = np.asarray(counts.sum(axis=1)).ravel().astype(np.float64)
        keep = self.photons > 0
        self.num_total = int(self.comm.allreduce(int(photons.num_frames))) if self.nranks > 1 \
            else photons.num_frames
        empty = int(self._sum(float((~keep).sum())))
        if empty == self.num_total:
            raise InputError(self.photon_files[0], "no frame has a photon on a used pixel")
        if empty:
            log.warning("%d frame(s) without a photon on a used pixel are left out", empty)
        if select is not None:  # only these frames (e.g. one model's of an earlier run)
            select = np.asarray(select, dtype=bool)
            if select.shape != (self.num_total,):
                raise InputError(None, f"a selection of {select.size} frames for "
                                       f"{self.num_total}")
            keep &= select[self.local_start:self.local_start + photons.num_frames]
        self.held = None
        if params.held_out > 0:  # a seeded share of all frames, the same for any rank count
            draw = np.random.default_rng([params.seed, 7]).random(self.num_total)
            draw = draw[self.local_start:self.local_start + photons.num_frames] < params.held_out
            self.held = counts[np.flatnonzero(keep & draw)]
            self.held_photons = self.photons[keep & draw]
            keep &= ~draw
        self.num_used = int(self._sum(float(keep.sum())))
        if self.num_used == 0:
            raise InputError(self.photon_files[0], "no frame selected")
        self.keep = keep
        self.counts = counts[np.flatnonzero(keep)]
        self.frame_photons = self.photons[keep]  # of the frames the EMC uses
        # "mean": one β for every frame, 1/sqrt of the mean count over all ranks' frames. With
        # β_d = 1/sqrt(photons_d) ("auto") the low-count frames anneal sharper than their evidence
        # warrants: from the same seeded models on the demo (K 4, num_div 4) 174 of them
        # drifted into the rod model (purity 0.77; one β: 0.99), on df80contam model ARI 0.65
        # against 0.71 with one β (docs/benchmarks.md)
        self.beta_start = params.beta_start
        if self.beta_start == "mean":
            self.beta_start = 1.0 / np.sqrt(max(
                self._sum(float(self.frame_photons.sum())) / self.num_used, 1.0))
        self.start = None
        if start is not None:  # start models (a file, or (K, V, V, V)) instead of the powder
            from spiscape.io.emc3d import read_start_models

            source = start if isinstance(start, (str, Path)) else None
            start = read_start_models(start) if source else np.asarray(start, dtype=np.float64)
            want = (params.num_models,) + (self.size,) * 3
            if start.shape != want:
                raise InputError(source, f"start models of shape {start.shape}; this detector "
                                         f"and num_models need {want}")
            self.start = start
        self.labels = None
        if labels is not None:
            self.labels = self._model_labels(np.asarray(labels), photons.num_frames)
        self.budget = memory_budget(params.memory_mb or (
            cpu_budget_mb() if self.xp is np else None), self.xp)
        self._corr = self.xp.asarray(self.corr.astype(np.float32))
        # with a point group, a first stage without it (see run): the orientations of this stage
        self.warmup = params.warmup if params.point_group not in ("1", "-1") else 0
        if self.warmup:
            self.set_sampling(max(1, params.num_div // 2), "1")
        else:
            self.set_sampling(params.num_div, params.point_group)

    def set_sampling(self, num_div: int, group: str) -> None:
        """Orientations of the refinement ``num_div`` in the asymmetric unit of ``group``, which
        the models are also symmetrised under; blocks sized from the memory budget."""
        params = self.params
        self.group = group
        self.quats, self.weights = quaternions.sample(num_div, group)
        self.log_weights = np.log(self.weights).astype(np.float32)
        pix, nq, k = self.used.size, len(self.quats), params.num_models
        # orientation blocks of ~8 M operator entries; views of all kept when they fit a third
        self.orient_block = max(1, min(nq, (8 << 20) // (8 * pix)))
        self.cache_views = pix * nq * k * 4 * 2 <= self.budget // 3
        per_frame = nq * k * 4 * 3 + pix * 4  # R and P (float32, with a temporary) + photons
        self.block_frames = params.block_frames or max(1, min(
            len(self.photons), (self.budget // 3) // per_frame))
        self._operators = {}
        tomogram_bytes = pix * nq * k * 4 if params.merge == "tomograms" else 0
        if tomogram_bytes > self.budget // 3:
            log.warning("emc3d: the tomograms (%d pixels x %d views, float32) take %.0f MB, more "
                        "than a third of the %.0f MB budget (--memory-mb, or --merge photons)",
                        pix, nq * k, tomogram_bytes / 2**20, self.budget / 2**20)
        log.info("emc3d: %d frames (%d here), %d used pixels, %d^3 grid, %d models x %d "
                 "orientations (num_div %d, point group %s), blocks of %d frames x %d "
                 "orientations, views %s", self.num_total, self.counts.shape[0], pix, self.size,
                 k, nq, num_div, group, self.block_frames, self.orient_block,
                 "cached" if self.cache_views else "sliced per block")

    def _model_labels(self, labels: np.ndarray, n_local: int) -> np.ndarray:
        """Each kept local frame's model from per-frame labels of all frames (e.g. the
        landscape's clusters): the distinct labels >= 0 in order are models 0..K−1, −1 is
        free."""
        if labels.shape != (self.num_total,):
            raise InputError(None, f"{labels.size} initial labels for {self.num_total} frames")
        names = np.unique(labels[labels >= 0])
        if names.size != self.params.num_models:
            raise ConfigError(f"the initial labels name {names.size} groups ({names.tolist()}) "
                              f"but num_models is {self.params.num_models}")
        mine = labels[self.local_start:self.local_start + n_local][self.keep]
        return np.where(mine >= 0, np.searchsorted(names, mine), -1)

    # ------------------------------------------------------------------ helpers
    def _sum(self, value: float) -> float:
        return float(self.comm.allreduce(float(value))) if self.nranks > 1 else float(value)

    def _allreduce(self, array: np.ndarray) -> np.ndarray:
        array = np.ascontiguousarray(to_numpy(array))
        if self.nranks == 1:
            return array
        out = np.empty_like(array)
        self.comm.Allreduce(array, out)
        return out

    def _allreduce_on_device(self, array):
        """The sum over ranks, left on the device (and untouched) on one rank."""
        return array if self.nranks == 1 else self.xp.asarray(self._allreduce(array))

    def _orient_blocks(self):
        step = self.orient_block
        return [(lo, min(lo + step, len(self.quats))) for lo in range(0, len(self.quats), step)]

    def _operator(self, lo: int, hi: int):
        """The slice operator of orientations lo..hi on the device (kept when views are)."""
        op = self._operators.get(lo)
        if op is None:
            op = slicing.operator(self.quats[lo:hi], self.q, self.size)
            if self.xp is not np:
                op = kernels.sparse_module(self.xp).csr_matrix(op)
            if self.cache_views:
                self._operators[lo] = op
        return op

    def _views(self, models, lo: int, hi: int):
        """(log-views (P, B·K) float32, view sums (B·K,)) of orientations lo..hi."""
        xp = self.xp
        w = slicing.views(self._operator(lo, hi), models, self.used.size)
        w *= self._corr[:, None]
        floor = kernels.LOG_FLOOR * float(w.mean()) + float(np.finfo(np.float32).tiny)
        w = xp.maximum(w, floor)
        return xp.log(w).astype(xp.float32), w.sum(axis=0)

    # ------------------------------------------------------------------ state
    def initial_state(self) -> EMC3DState:
        """Models from the powder: the mean photons at each |q| (all ranks' frames), spread
        isotropically on the grid, times (1 + noise · uniform(−1, 1)) of a seeded generator,
        one per model, symmetrised; scales 1 (the models carry the photons). Given start models
        replace the powder (symmetrised, no noise)."""
        if self.start is not None:
            models = slicing.symmetrize(self.start, self.group)
            return EMC3DState(models=models, scale=np.ones(self.counts.shape[0]))
        radius = np.sqrt((self.q**2).sum(axis=0))
        shells = np.rint(radius).astype(np.int64)
        sums = self._allreduce(np.bincount(shells, weights=np.asarray(
            self.counts.sum(axis=0)).ravel(), minlength=self.size))
        hits = np.bincount(shells, minlength=self.size).astype(np.float64)
        profile = sums / np.maximum(hits, 1) / self.num_used
        filled = hits > 0
        profile = np.interp(np.arange(self.size), np.flatnonzero(filled), profile[filled])
        r = centred_radius((self.size,) * 3)
        base = np.interp(r, np.arange(self.size), profile)
        rng = np.random.default_rng(self.params.seed)
        models = np.stack([base * (1 + self.params.init_noise * rng.uniform(
            -1, 1, base.shape)) for _ in range(self.params.num_models)])
        models = slicing.symmetrize(np.maximum(models, 0), self.group)
        return EMC3DState(models=models.astype(np.float64),
                          scale=np.ones(self.counts.shape[0]))

    # ------------------------------------------------------------------ one iteration
    def iterate(self, state: EMC3DState, collect: bool = False):
        """One EM step: returns the new state and the per-iteration statistics (and, with
        ``collect``, each local frame's best model, orientation, probability and log-lik)."""
        xp, p = self.xp, self.params
        t0 = time.perf_counter()
        k_models = p.num_models
        models = xp.asarray(state.models.reshape(k_models, -1).astype(np.float32))
        blocks = self._orient_blocks()
        cached = [self._views(models, lo, hi) for lo, hi in blocks] if self.cache_views else None
        beta = kernels.beta_schedule(self.frame_photons, state.iteration, self.beta_start,
                                     p.beta_jump, p.beta_period)
        grid_num = xp.zeros((k_models, self.size**3), dtype=xp.float32)
        den = xp.zeros(len(self.quats) * k_models, dtype=xp.float64)
        log_w = xp.asarray(np.repeat(self.log_weights, k_models))
        n_local = self.counts.shape[0]
        new_scale = np.empty(n_local)
        loglik = np.empty(n_local)
        mutual = np.empty(n_local)
        best_j = np.empty(n_local, dtype=np.int64)
        best_p = np.empty(n_local)
        model_frames = np.zeros(k_models)
        tomograms = p.merge == "tomograms"
        if tomograms:  # Σ_d P_dj K_dt per pixel and view, summed over the frame blocks
            tomo = [xp.zeros((self.used.size, (hi - lo) * k_models), dtype=xp.float32)
                    for lo, hi in blocks]
            reach = xp.zeros(len(self.quats) * k_models, dtype=bool)
        for f0 in range(0, n_local, self.block_frames):
            f1 = min(f0 + self.block_frames, n_local)
            part = self.counts[f0:f1]
            dense = part.nnz > 0.05 * part.shape[0] * part.shape[1]
            frames = xp.asarray(part.toarray()) if dense else (
                part if xp is np else kernels.sparse_module(xp).csr_matrix(part))
            scale = xp.asarray(state.scale[f0:f1].astype(np.float32))
            log_r = xp.empty((f1 - f0, len(self.quats) * k_models), dtype=xp.float32)
            sums = []
            for b, (lo, hi) in enumerate(blocks):
                lw, ws = cached[b] if cached else self._views(models, lo, hi)
                cols = slice(lo * k_models, hi * k_models)
                log_r[:, cols] = kernels.product(frames, lw, xp)
                log_r[:, cols] -= scale[:, None] * ws[None, :].astype(xp.float32)
                sums.append(ws)
            log_r += log_w[None, :]
            if self.labels is not None and state.iteration < p.label_iterations:
                # the first iterations hold each labelled frame to its group's model
                held = self.labels[f0:f1]
                other = (held[:, None] >= 0) & (np.arange(k_models)[None, :] != held[:, None])
                forbid = np.where(other, np.float32(-1e30), np.float32(0))
                log_r += xp.asarray(np.tile(forbid, (1, len(self.quats))))
            view_sums = xp.concatenate(sums)
            prob, logsum, info = kernels.responsibilities(log_r, xp.asarray(beta[f0:f1]), xp)
            del log_r
            loglik[f0:f1] = to_numpy(logsum)
            mutual[f0:f1] = to_numpy(info)
            best = to_numpy(prob.argmax(axis=1))
            best_j[f0:f1] = best
            best_p[f0:f1] = to_numpy(prob[xp.arange(f1 - f0), xp.asarray(best)])
            model_frames += to_numpy(prob.reshape(f1 - f0, -1, k_models).sum(axis=(0, 1)))
            expected = to_numpy(prob @ view_sums.astype(xp.float32)).astype(np.float64)
            new_scale[f0:f1] = (self.frame_photons[f0:f1] / np.maximum(expected, 1e-30)
                                if p.need_scaling else 1.0)
            den += (scale[None, :].astype(xp.float32) @ prob)[0].astype(xp.float64)
            if tomograms:
                reach |= (prob >= np.float32(np.exp(-TOMOGRAM_REACH))
                          * prob.max(axis=1, keepdims=True)).any(axis=0)
            frames_t = frames.T
            for b, (lo, hi) in enumerate(blocks):
                cols = slice(lo * k_models, hi * k_models)
                numerator = kernels.product(frames_t, xp.ascontiguousarray(prob[:, cols]), xp)
                if tomograms:
                    tomo[b] += numerator
                else:
                    grid_num += slicing.merge(self._operator(lo, hi), numerator, k_models)
            del prob
        grid_den = xp.zeros((k_models, self.size**3), dtype=xp.float64)
        if tomograms:
            # EMC's compress step (Loh & Elser 2009, as Dragonfly does it): each reached view's
            # tomogram, its photons over Σ_d P_dj φ_d c_t, merged with the interpolation weights
            # as its weight, so every orientation's estimate counts alike
            den = self._allreduce_on_device(den)
            reach = (self._allreduce_on_device(reach.astype(np.uint8)) > 0) & (den > 0)
            for b, (lo, hi) in enumerate(blocks):
                cols = slice(lo * k_models, hi * k_models)
                part = self._allreduce_on_device(tomo[b])
                live = reach[cols].astype(xp.float32)
                scale_j = live / xp.where(reach[cols], den[cols], 1.0).astype(xp.float32)
                op = self._operator(lo, hi)
                grid_num += slicing.merge(op, part * scale_j[None, :] / self._corr[:, None],
                                          k_models)
                grid_den += slicing.merge(op, xp.broadcast_to(live[None, :], part.shape),
                                          k_models)
                tomo[b] = None
        else:
            # the exact M-step: Σ_d P_dj K_dt over Σ_d P_dj φ_d c_t at every pixel of view j,
            # both merged (every photon counts alike)
            ones = self._corr[:, None]
            for lo, hi in blocks:
                cols = slice(lo * k_models, hi * k_models)
                values = ones * den[cols][None, :].astype(xp.float32)
                grid_den += slicing.merge(self._operator(lo, hi), values, k_models)
            grid_num, grid_den = self._allreduce(grid_num), self._allreduce(grid_den)
        # (with tomograms every rank merged the same reduced sums)
        grid_num, grid_den = to_numpy(grid_num).astype(np.float64), to_numpy(grid_den)
        shape = (k_models, self.size, self.size, self.size)
        num = slicing.symmetrize(grid_num.reshape(shape), self.group)
        dnm = slicing.symmetrize(grid_den.reshape(shape), self.group)
        reached = dnm > 1e-12 * dnm.max()
        new_models = np.where(reached, num / np.where(reached, dnm, 1.0), state.models)
        change = np.sqrt(((new_models - state.models) ** 2).sum(axis=(1, 2, 3))
                         / np.maximum((state.models**2).sum(axis=(1, 2, 3)), 1e-30))
        occupancy = self._allreduce(model_frames) / self.num_used
        row = {"iteration": state.iteration + 1, "beta_mean": self._sum(beta.sum())
               / self.num_used, "rms_change": float(change.max()),
               "mutual_info": self._sum(mutual.sum()) / self.num_used,
               "log_likelihood": self._sum(loglik.sum()) / self.num_used,
               "occupancy": [round(float(x), 4) for x in occupancy],
               "seconds": round(time.perf_counter() - t0, 3)}
        new = EMC3DState(models=new_models, scale=new_scale, iteration=state.iteration + 1,
                         log_rows=[*state.log_rows, row])
        if not collect:
            return new, row
        orient, model = np.divmod(best_j, k_models)
        frames = {"model": model, "orientation": orient, "probability": best_p,
                  "log_likelihood": loglik, "scale": state.scale}
        return new, row, frames

    def held_out_loglik(self, models: np.ndarray, occupancy: np.ndarray) -> np.ndarray:
        """Log-likelihood (nats) of each held-out frame of this rank under the fitted mixture:
        models weighted by their occupancy, orientations by their share of SO(3), at β = 1, each
        view's scale at its maximum-likelihood value N_d / Σ_t W_tj (so Σ_t K_dt log W_tj −
        N_d log Σ_t W_tj + N_d log N_d − N_d), up to the frame's Σ log K_dt!, which does not
        depend on the models. Comparable between runs with different K on the same held-out
        frames (same seed and share). Not a K selector by itself: on one population of cubes
        (400 frames, 1500 photons) it rose from K 1 to 2 to 3 at num_div 3 and from 1 to 2 at
        num_div 6, an extra model also buying finer orientations."""
        xp, k = self.xp, self.params.num_models
        flat = xp.asarray(models.reshape(k, -1).astype(np.float32))
        mix = np.log(np.maximum(np.asarray(occupancy, dtype=np.float64), 1e-12))
        log_w = xp.asarray((self.log_weights[:, None] + mix[None, :]).reshape(-1))
        blocks = self._orient_blocks()
        out = []
        for f0 in range(0, self.held.shape[0], self.block_frames):
            part = self.held[f0:f0 + self.block_frames]
            frames = xp.asarray(part.toarray())
            n = xp.asarray(self.held_photons[f0:f0 + self.block_frames].astype(np.float32))
            log_r = xp.empty((part.shape[0], len(self.quats) * k), dtype=xp.float32)
            for lo, hi in blocks:
                lw, ws = self._views(flat, lo, hi)
                log_r[:, lo * k:hi * k] = (kernels.product(frames, lw, xp)
                                           - n[:, None] * xp.log(ws)[None, :].astype(xp.float32))
            log_r = log_r.astype(xp.float64) + log_w[None, :]
            top = log_r.max(axis=1)
            ll = top + xp.log(xp.exp(log_r - top[:, None]).sum(axis=1))
            out.append(to_numpy(ll + n * xp.log(xp.maximum(n, 1)) - n))
        return np.concatenate(out) if out else np.zeros(0)

    def symmetrize_stage(self, state: EMC3DState) -> EMC3DState:
        """End of the warm-up without symmetry: each model turned so that its symmetry axes lie
        on the grid's (:func:`slicing.align_to_group`), symmetrised, and the point group's
        sampling at the full ``num_div`` from here on. An isotropic start symmetrised from the
        first iteration falls into a dual optimum (a cube's streaks on the body diagonals
        instead of the axes); without symmetry the data choose the axes."""
        models = state.models.copy()
        for k, model in enumerate(models):
            quat, share = slicing.align_to_group(model, self.params.point_group)
            models[k] = slicing.rotate(model, quat[None])
            log.info("model %d: point group %s axes found (%.1f%% of its power symmetric)", k,
                     self.params.point_group, 100 * share)
        models = self.comm.bcast(models if self.rank == 0 else None, root=0)
        self.set_sampling(self.params.num_div, self.params.point_group)
        models = slicing.symmetrize(np.maximum(models, 0), self.group)
        return EMC3DState(models=models, scale=state.scale, iteration=state.iteration,
                          log_rows=state.log_rows)

    # ------------------------------------------------------------------ driver
    def _fingerprint(self) -> dict:
        if not hasattr(self, "_hash"):
            self._hash = self.comm.bcast(photon_fingerprint(self.photon_files)
                                         if self.rank == 0 else None, root=0)
        params = {k: v for k, v in asdict(self.params).items()
                  if k not in ("block_frames", "memory_mb", "device")}
        return {"params": params, "photons": self._hash, "frames": self.num_total,
                "used": self.num_used}

    def gather(self, local: np.ndarray):
        if self.nranks == 1:
            return local
        parts = self.comm.gather(local, root=0)
        return np.concatenate(parts) if self.rank == 0 else None

    def _full(self, values: np.ndarray, fill) -> np.ndarray:
        """Values of the kept local frames spread over all local frames (``fill`` elsewhere)."""
        out = np.full((self.keep.size, *values.shape[1:]), fill, dtype=values.dtype)
        out[self.keep] = values
        return out

    def save_checkpoint(self, path: Path, state: EMC3DState) -> None:
        scale = self.gather(self._full(state.scale, 1.0))
        if self.rank == 0:
            write_checkpoint(path, state.models, scale, state.iteration, state.log_rows,
                             self._fingerprint())

    def load_checkpoint(self, path: Path) -> EMC3DState:
        saved = read_checkpoint(path, self._fingerprint())
        local = saved["scale"][self.local_start:self.local_start + self.keep.size][self.keep]
        return EMC3DState(models=saved["intens"], scale=local, iteration=saved["iteration"],
                          log_rows=saved["log_rows"])

    def run(self, out, checkpoint=None, resume: bool = False,
            q_per_voxel: float | None = None) -> dict:
        """Iterate to ``params.iterations`` (checkpointing after each), then write ``out``
        (:mod:`spiscape.io.emc3d`). Returns the per-frame results on rank 0."""
        from spiscape.io.emc3d import write_emc3d
        from spiscape.utils.atomic import check_output

        out = check_output(out)
        checkpoint = check_output(checkpoint or out.with_name(out.stem + ".ckpt.h5"))
        if resume and checkpoint.exists():
            state = self.load_checkpoint(checkpoint)
            log.info("resuming from %s after iteration %d", checkpoint, state.iteration)
        else:
            state = self.initial_state()
        from tqdm import tqdm

        bar = tqdm(total=self.params.iterations, initial=state.iteration, unit="iter",
                   desc="emc3d", disable=None if self.rank == 0 else True)
        frames = None
        if self.warmup and state.iteration >= self.warmup:
            self.set_sampling(self.params.num_div, self.params.point_group)
        while state.iteration < self.params.iterations:
            if self.warmup and state.iteration == self.warmup and self.group == "1":
                state = self.symmetrize_stage(state)
            last = state.iteration + 1 == self.params.iterations
            if last:
                state, row, frames = self.iterate(state, collect=True)
            else:
                state, row = self.iterate(state)
                self.save_checkpoint(checkpoint, state)
            if self.rank == 0:
                log.info("iteration %d: beta %.3g, rms change %.4f, mutual info %.3f, "
                         "occupancy %s, %.2f s", row["iteration"], row["beta_mean"],
                         row["rms_change"], row["mutual_info"], row["occupancy"],
                         row["seconds"])
            bar.update(1)
        bar.close()
        if frames is None:  # resumed from a finished run's checkpoint: the E-step only
            _, _, frames = self.iterate(state, collect=True)
        per_frame = {
            "model": self.gather(self._full(frames["model"].astype(np.int32), -1)),
            "quaternion": self.gather(self._full(self.quats[frames["orientation"]], np.nan)),
            "probability": self.gather(self._full(frames["probability"], 0.0)),
            "log_likelihood": self.gather(self._full(frames["log_likelihood"], np.nan)),
            "scale": self.gather(self._full(frames["scale"], np.nan)),
        }
        occupancy = np.array(state.log_rows[-1]["occupancy"])
        held_attrs = {}
        if self.held is not None:
            ll = self.held_out_loglik(state.models, occupancy)
            count = self._sum(float(ll.size))
            held_attrs = {"held_out_frames": int(count),
                          "held_out_loglik_per_frame": self._sum(float(ll.sum())) / max(count, 1),
                          "held_out_loglik_per_photon": self._sum(float(ll.sum())) / max(
                              self._sum(float(self.held_photons.sum())), 1.0)}
            if self.rank == 0:
                log.info("held-out frames: %d, log-likelihood %.2f per frame (%.4f per photon) "
                         "with K = %d", held_attrs["held_out_frames"],
                         held_attrs["held_out_loglik_per_frame"],
                         held_attrs["held_out_loglik_per_photon"], self.params.num_models)
        if self.rank == 0:
            write_emc3d(out, models=state.models, frames=per_frame, occupancy=occupancy,
                        log_rows=state.log_rows,
                        attrs={"params": json.dumps(asdict(self.params)),
                               "detector": str(self.detector_path),
                               "photons": json.dumps([str(p) for p in self.photon_files]),
                               "num_orientations": len(self.quats), **held_attrs,
                               **({"q_per_voxel_inv_nm": q_per_voxel} if q_per_voxel else {})})
            if checkpoint.exists():
                checkpoint.unlink()
        return per_frame


def cpu_budget_mb() -> int:
    """The 3D EMC's default memory budget on a CPU: 4 GiB, or a quarter of the machine's memory
    if less (the 2D EMC keeps 1 GiB). Its views are K × orientations × pixels: on an 80² detector
    at num_div 4 with K 4 they need 0.5 GB; sliced again for every block of frames when they did
    not fit a third of the old 1 GiB, an iteration of df80contam took 92 s instead of 13 s."""
    import os

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1024
    return int(max(256, min(4096, total / 4 / 2**20)))


def landscape_groups(coords, count: int, seed: int):
    """K groups of the frames by k-means on their (standardised) landscape coordinates; frames
    without coordinates −1."""
    import numpy as np
    from sklearn.cluster import KMeans

    coords = np.asarray(coords, dtype=np.float64)
    placed = np.all(np.isfinite(coords), axis=1)
    labels = np.full(len(coords), -1, dtype=np.int64)
    z = coords[placed]
    z = (z - z.mean(axis=0)) / np.maximum(z.std(axis=0), 1e-12)
    labels[placed] = KMeans(count, n_init=10, random_state=seed).fit_predict(z)
    return labels
