"""Training the amortised model on streamed blocks of frames, and inferring every frame's pose,
conformation and scale.

Training: Adam on the negative ELBO (:mod:`.model`), blocks of frames read in a shuffled order
each epoch (memory bounded by one block), DistributedDataParallel under torchrun (each rank
takes every world-th batch), bf16 autocast on a GPU, a checkpoint per epoch that resumes
bit-for-bit on a CPU.

Inference (semi-amortised, as cryoSPIN refines an encoder's poses): the encoder's best
hypothesis (by likelihood), then (``refine``) a local search of the rotation on two finer grids
around it at the encoder's z, and for a one-dimensional z its posterior mean on a grid of
decoded volumes at the refined pose (exact for the 1D latent: prior x likelihood of the frame).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import h5py
import numpy as np
import torch

from spiscape.amortise import data as adata
from spiscape.amortise.model import AmortisedModel
from spiscape.errors import ConfigError
from spiscape.io.amortise import create_datasets
from spiscape.io.weights import load_plain, plain
from spiscape.orient import rotations
from spiscape.simulate.detector import q_magnitude
from spiscape.utils.atomic import atomic_path
from spiscape.vae.train import load_checkpoint, save_checkpoint, set_rng_states, setup_distributed

log = logging.getLogger(__name__)


@dataclass
class AmortiseConfig:
    zdim: int = 1
    hypotheses: int = 8
    epochs: int = 10
    batch_size: int = 32
    lr: float = 5e-4
    decoder_lr: float = 1e-4
    kl_weight: float = 1.0
    wta_relax: float = 0.05
    block_frames: int = 2048
    volume_size: int = 0  # 0: the warm start's, else from the detector (at most 61)
    point_group: str = "m-3m"
    enc_channels: int = 32
    dec_channels: int = 32
    hidden: int = 256
    image_max: int = 64
    seed: int = 1
    device: str = "auto"
    threads: int = 0
    refine: bool = True
    z_grid: int = 41

    def check(self) -> None:
        for name in ("zdim", "hypotheses", "epochs", "batch_size", "block_frames", "z_grid"):
            if getattr(self, name) < 1:
                raise ConfigError(f"amortise {name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "decoder_lr"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"amortise {name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.wta_relax < 1:
            raise ConfigError(f"amortise wta_relax must be in [0, 1), got {self.wta_relax}")
        if self.volume_size and self.volume_size % 2 == 0:
            raise ConfigError(f"amortise volume_size must be odd, got {self.volume_size}")


def auto_volume_size(det) -> int:
    """Odd grid side holding the used pixels' |q| (capped at 61, the VAE's default)."""
    qn = q_magnitude(det)[np.asarray(det.mask) == 0]
    return int(min(2 * int(np.ceil(qn.max())) + 3, 61))


def build(cfg: AmortiseConfig, det, dataset, vae_blob: dict | None = None,
          init_volume: np.ndarray | None = None):
    """The model and its pixels; the decoder warm-started from a VAE (its blob: config,
    state_dict, profile) or from one volume when given."""
    if vae_blob is not None:
        vcfg = vae_blob["config"]
        if vcfg["point_group"] != cfg.point_group:
            raise ConfigError(f"the VAE's point group {vcfg['point_group']} differs from "
                              f"amortise point_group {cfg.point_group}")
        step = float(vae_blob.get("train_config", {}).get("q_step", 1.0))
        if step != 1.0:
            raise ConfigError(f"the VAE's grid has a q step of {step:g} detector pixels per "
                              "voxel; amortise warm-starts only from a VAE with q_step 1")
        cfg.zdim, cfg.volume_size = int(vcfg["zdim"]), int(vcfg["volume_size"])
        cfg.dec_channels, cfg.hidden = int(vcfg["dec_channels"]), int(vcfg["hidden"])
    if not cfg.volume_size:
        cfg.volume_size = auto_volume_size(det)
    pixels = adata.select_pixels(det, cfg.volume_size, cfg.image_max)
    if vae_blob is not None:
        profile = np.log(np.asarray(vae_blob["profile"], dtype=np.float64))
    else:
        profile = adata.radial_log_profile(dataset, pixels, cfg.volume_size)
    torch.manual_seed(cfg.seed)  # the initial weights
    model = AmortisedModel(cfg.zdim, cfg.volume_size, profile, pixels.q, pixels.corr,
                           pixels.background, cfg.point_group, cfg.hypotheses,
                           cfg.enc_channels, cfg.dec_channels, cfg.hidden, cfg.wta_relax)
    if vae_blob is not None:
        model.load_vae_decoder(vae_blob["state_dict"])
    elif init_volume is not None:
        model.load_volume(init_volume)
    return model, pixels, profile


def _batches(num: int, batch: int, world: int, rank: int, rng) -> list[np.ndarray]:
    """This rank's batches of a block's shuffled rows: every rank gets the same number."""
    order = rng.permutation(num)
    batches = [order[i:i + batch] for i in range(0, num, batch)]
    per_rank = len(batches) // world if world > 1 else len(batches)
    return batches[rank::world][:per_rank]


def train(cfg: AmortiseConfig, dataset, model: AmortisedModel, pixels, checkpoint=None,
          resume: bool = False, fingerprint: dict | None = None, select=None) -> dict:
    """Train in place on every frame, or on the frames ``select`` (bool, one per frame) marks;
    returns the history (per epoch: loss, nll and kl per frame, frames/s)."""
    ctx = setup_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model.to(ctx.device)
    params = [{"params": model.encoder.parameters(), "lr": cfg.lr},
              {"params": model.decoder.parameters(), "lr": cfg.decoder_lr}]
    optimiser = torch.optim.Adam(params)
    history: list[dict] = []
    start_epoch = 0
    if resume and checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        if fingerprint is not None and state.get("fingerprint") != fingerprint:
            raise ConfigError(f"{checkpoint}: the checkpoint was made with other settings or "
                              "data; remove it or drop --resume")
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        set_rng_states(state["rng"])
        history, start_epoch = list(state["history"]), int(state["epoch"])
        log.info("resumed after epoch %d", start_epoch)
    net = model
    if ctx.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    dense = adata.Densifier(pixels, ctx.device)
    blocks = adata.block_bounds(dataset.num_frames, cfg.block_frames)
    amp = ctx.device.type == "cuda"
    for epoch in range(start_epoch, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])
        totals = np.zeros(4)  # loss, nll, kl, frames
        tic = time.perf_counter()
        net.train()
        for b in rng.permutation(len(blocks)):
            a, z = blocks[b]
            csr = adata.read_block(dataset, pixels, a, z)
            mine = np.arange(z - a) if select is None else np.flatnonzero(select[a:z])
            for rows in _batches(len(mine), cfg.batch_size, ctx.world, ctx.rank, rng):
                counts, image, support, logn = dense(csr[mine[rows]])
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
                    nll, kl, _ = net(image, support, logn, counts)
                loss = (nll + cfg.kl_weight * kl).mean()
                # Adam is invariant to the loss's scale; per photon keeps the logs readable
                optimiser.zero_grad(set_to_none=True)
                (loss / counts.sum(1).mean().clamp_min(1.0)).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                optimiser.step()
                n = len(rows)
                totals += [float(loss.detach()) * n, float(nll.detach().mean()) * n,
                           float(kl.detach().mean()) * n, n]
        seconds = time.perf_counter() - tic
        if ctx.world > 1:  # the epoch's sums over all ranks
            summed = torch.as_tensor(totals, dtype=torch.float64, device=ctx.device)
            torch.distributed.all_reduce(summed)
            totals = summed.cpu().numpy()
        row = {"epoch": epoch + 1, "loss": totals[0] / totals[3], "nll": totals[1] / totals[3],
               "kl": totals[2] / totals[3], "frames_per_s": totals[3] / seconds,
               "frames": int(totals[3]), "seconds": seconds}
        history.append(row)
        (log.info if ctx.main else log.debug)(
            "epoch %d/%d  loss %.2f  nll %.2f  kl %.3f per frame  %.0f frames/s", epoch + 1,
            cfg.epochs, row["loss"], row["nll"], row["kl"], row["frames_per_s"])
        if ctx.main and checkpoint is not None:
            save_checkpoint(checkpoint, model, optimiser, epoch + 1, history, {},
                            {"fingerprint": fingerprint or {}})
    model.eval()
    return {"history": history, "config": asdict(cfg)}


# --------------------------------------------------------------------------- inference
def _local_search(model, vols, rot, counts, step_deg: float, radius_deg: float):
    """Best rotation (B, 3, 3) on a local grid R δ around each frame's R, and its NLL."""
    local = torch.as_tensor(rotations.to_matrix(rotations.local_grid(step_deg, radius_deg)),
                            dtype=rot.dtype, device=rot.device)
    trial = rot[:, None] @ local[None]  # (B, G, 3, 3)
    nll, _ = model.nll(vols, trial, counts)
    best = nll.argmin(1)
    return trial[torch.arange(len(rot)), best], nll.min(1).values


def _friedel_twin(model, vols, rot, counts):
    """R or its Friedel twin R Rz(π), whichever explains the frame better: a centrosymmetric
    intensity shows the two alike but for the Ewald sphere's curvature, so a single frame
    tells them apart only by that (an encoder rarely learns it)."""
    flip = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=rot.dtype, device=rot.device))
    both = torch.stack([rot, rot @ flip], dim=1)
    nll, _ = model.nll(vols, both, counts)
    return both[torch.arange(len(rot)), nll.argmin(1)]


def latent_grid(mu: np.ndarray, num: int) -> np.ndarray:
    """Points (num,) spanning the prior's bulk and the encoded range for the 1D posterior."""
    lo = min(float(np.min(mu)) - 0.5, -3.0)
    hi = max(float(np.max(mu)) + 0.5, 3.0)
    return np.linspace(lo, hi, num)


@torch.no_grad()
def infer(cfg: AmortiseConfig, dataset, model: AmortisedModel, pixels, out_path,
          attrs: dict | None = None, device="cpu") -> None:
    """Each frame's quaternion, z, scale (and the encoder's own guesses) into ``out_path``
    (HDF5, written block by block into a temporary file that replaces the target at the end)."""
    model.eval().to(device)
    dense = adata.Densifier(pixels, device)
    n = dataset.num_frames
    zdim = model.zdim
    grid_vols = zgrid = None
    if cfg.refine and zdim == 1:
        # the 1D posterior needs z's range: encode every frame once (cheap next to the search)
        mus = []
        for a, b in adata.block_bounds(n, cfg.block_frames):
            csr = adata.read_block(dataset, pixels, a, b)
            for i in range(0, csr.shape[0], 256):
                _, image, support, logn = dense(csr[i:i + 256])
                mus.append(model.encoder(image, support, logn)[1].cpu().numpy())
        zgrid = latent_grid(np.concatenate(mus), cfg.z_grid)
        grid_vols = model.symmetric(torch.as_tensor(zgrid[:, None], dtype=torch.float32,
                                                    device=device))
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as f:
        ds = create_datasets(f, n, zdim)
        for a, b in adata.block_bounds(n, cfg.block_frames):
            csr = adata.read_block(dataset, pixels, a, b)
            for i in range(0, csr.shape[0], cfg.batch_size * 2):
                counts, image, support, logn = dense(csr[i:i + cfg.batch_size * 2])
                rot_h, mu, logvar = model.encoder(image, support, logn)
                vols = model.symmetric(mu)
                nll, _ = model.nll(vols, rot_h, counts)
                best = nll.argmin(1)
                rows = torch.arange(len(best))
                rot_enc = rot_h[rows, best]
                rot, z = rot_enc, mu
                if cfg.refine:
                    rot, _ = _local_search(model, vols, rot, counts, 4.0, 12.0)
                    rot = _friedel_twin(model, vols, rot, counts)
                    rot, _ = _local_search(model, vols, rot, counts, 1.0, 2.0)
                    if grid_vols is not None:
                        z = _posterior_z(model, grid_vols, zgrid, rot, counts)
                        vols = model.symmetric(z)
                        rot, _ = _local_search(model, vols, rot, counts, 0.5, 1.0)
                nll_final, phi = model.nll(vols, rot[:, None], counts)
                sl = slice(a + i, a + i + len(best))
                q_enc = rotations.from_matrix(rot_enc.cpu().double().numpy())
                q_fin = rotations.from_matrix(rot.cpu().double().numpy())
                photons = counts.sum(1).cpu().numpy()
                ds["quaternion"][sl] = q_fin
                ds["quaternion_encoder"][sl] = q_enc
                ds["z"][sl] = z.cpu().numpy()
                ds["z_encoder"][sl] = mu.cpu().numpy()
                ds["z_logvar"][sl] = logvar.cpu().numpy()
                ds["scale"][sl] = phi[:, 0].cpu().numpy()
                ds["nll_per_photon"][sl] = (nll_final[:, 0].cpu().numpy()
                                            / np.maximum(photons, 1))
                ds["pose_change_deg"][sl] = rotations.misorientation_deg(q_enc, q_fin)
                ds["hypothesis"][sl] = best.cpu().numpy()
                ds["photons"][sl] = photons
            log.info("inferred %d/%d frames", b, n)
        f.attrs["num_frames"] = n
        f.attrs["quaternion_convention"] = (
            "scalar-first (w, x, y, z): frame d shows the decoded intensity at R_d q_t; "
            "equivalent modulo the point group")
        for key, value in (attrs or {}).items():
            f.attrs[key] = value


def _posterior_z(model, grid_vols, zgrid, rot, counts):
    """Posterior mean of a 1D z on the grid (prior N(0, 1) x the frame's likelihood at the
    rotation ``rot``), (B, 1)."""
    nll = []
    for g in range(grid_vols.shape[0]):
        vols = grid_vols[g:g + 1].expand(len(rot), *grid_vols.shape[1:])
        nll.append(model.nll(vols, rot[:, None], counts)[0][:, 0])
    nll = torch.stack(nll, 1)  # (B, G)
    zg = torch.as_tensor(zgrid, dtype=nll.dtype, device=nll.device)
    logp = -nll - 0.5 * zg**2
    w = torch.softmax(logp, dim=1)
    return (w * zg).sum(1, keepdim=True)


@torch.no_grad()
def population_latent(model: AmortisedModel, dataset, pixels, frames: np.ndarray,
                      quaternions: np.ndarray, zgrid: np.ndarray) -> float:
    """The one z (1D) that explains a set of frames best at their poses: the grid point of the
    least summed NLL, refined by a parabola through its neighbours. Unlike the median of the
    frames' posterior means, it is not pulled towards the prior's centre by each frame's
    shrinkage (a population's z, e.g. where its volume is read)."""
    frames = np.asarray(frames)
    vols = model.symmetric(torch.as_tensor(np.asarray(zgrid)[:, None], dtype=torch.float32))
    total = np.zeros(len(zgrid))
    for i in range(0, len(frames), 256):
        idx = frames[i:i + 256]
        counts = torch.as_tensor(adata.read_frames(dataset, pixels, idx).toarray())
        rot = torch.as_tensor(rotations.to_matrix(quaternions[idx]), dtype=torch.float32)
        for g in range(len(zgrid)):
            v = vols[g:g + 1].expand(len(idx), *vols.shape[1:])
            total[g] += float(model.nll(v, rot[:, None], counts)[0].sum())
    k = int(np.argmin(total))
    if 0 < k < len(zgrid) - 1:
        a, b, c = total[k - 1:k + 2]
        denom = a - 2 * b + c
        if denom > 0:
            return float(zgrid[k] + 0.5 * (a - c) / denom * (zgrid[1] - zgrid[0]))
    return float(zgrid[k])


def fingerprint(cfg: AmortiseConfig, files, warm: str, select=None) -> dict:
    """What a checkpoint must match to be resumed: the settings that change the training, the
    photon files (names and sizes), the warm start and the frames trained on."""
    import hashlib

    keep = {k: v for k, v in asdict(cfg).items()
            if k not in ("epochs", "device", "threads", "refine", "z_grid")}
    chosen = "all" if select is None else hashlib.sha256(
        np.packbits(np.asarray(select, dtype=bool)).tobytes()).hexdigest()
    return {"config": keep, "files": [[str(p), p.stat().st_size] for p in files],
            "warm_start": warm, "frames": chosen}


def landscape_frames(landscape: dict, num_frames: int) -> np.ndarray | None:
    """The frames the 2D route's VAE placed (a finite per-frame latent in frames.h5: the
    clusters it trained on, contaminant clusters left out), or None when it has none."""
    latent = landscape.get("latent")
    if latent is None or latent.shape[0] != num_frames:
        return None
    placed = np.all(np.isfinite(latent), axis=1)
    return placed if placed.any() else None


def save_model(path, model: AmortisedModel, profile: np.ndarray, extra: dict) -> None:
    """model.pt: config, state dict (with the pixels' q, corr, background as buffers) and the
    decoder's radial log profile, as plain tensors and numbers (read with weights_only)."""
    with atomic_path(path) as tmp:
        torch.save(plain({"config": model.config, "state_dict": model.state_dict(),
                          "log_profile": np.asarray(profile), **extra}), tmp)


def load_model(path, device="cpu") -> AmortisedModel:
    blob = load_plain(path, "amortise model")
    state = blob["state_dict"]
    bg = state.get("background")
    model = AmortisedModel(radial_log_profile=np.asarray(blob["log_profile"]),
                           q=state["q"].numpy(), corr=state["corr"].numpy(),
                           background=None if bg is None else bg.numpy(), **blob["config"])
    model.load_state_dict(state)
    return model.to(device).eval()
