"""Training loop: Adam on the Poisson ELBO, DistributedDataParallel under torchrun, bf16 autocast
on GPU, a checkpoint per epoch with everything needed to resume bit-for-bit on CPU, and the
convergence checks cryoDRGN users expect (volumes at fixed latent points and the latents of the
data compared between checks).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

from spiscape.errors import ConfigError
from spiscape.io.weights import load_plain, plain
from spiscape.utils.atomic import atomic_path
from spiscape.vae.model import SPIVAE, kl_divergence, poisson_loss

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    zdim: int = 1
    volume_size: int = 61
    point_group: str = "m-3m"
    epochs: int = 300  # as spiscape vae --epochs and the workflow's config
    batch_size: int = 8
    lr: float = 1e-3
    kl_weight: float = 0.001
    seed: int = 1
    device: str = "auto"
    check_every: int = 5
    enc_channels: int = 16
    dec_channels: int = 32
    hidden: int = 256
    threads: int = 1
    frame_weighting: str = "none"
    q_min: float = 0.0
    q_step: float = 1.0  # detector pixels per voxel of the volume grid
    radial_weighting: float = 0.5
    lr_schedule: str = "cosine"
    lr_final: float = 0.05
    refine_poses: bool = False
    pose_lr: float = 1e-3
    pose_start: int = 10
    size_correction: str = "none"  # "commonlines": each average sliced at its own size
    average_tilt: float = 0.0  # degrees: each average predicted over a ring of tilts (model.py)
    learn_tilt: bool = False  # ... the angle fitted with the decoder from epoch pose_start
    extra: dict = field(default_factory=dict)


#: starting angle (degrees) of --average-tilt auto
AVERAGE_TILT_START = 8.0


def tilt_settings(value) -> tuple[float, bool]:
    """(average_tilt, learn_tilt) of the --average-tilt value: 'auto' (fitted from
    :data:`AVERAGE_TILT_START`) or an angle in degrees (fixed; 0 one slice)."""
    if value == "auto":
        return AVERAGE_TILT_START, True
    return float(value), False


# --------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Rank, world size and device; initialises the process group when launched by torchrun
    (WORLD_SIZE > 1): nccl on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda but no GPU is visible")
        dev = torch.device("cuda", local_rank if world > 1 else (torch.device(device).index or 0))
        torch.cuda.set_device(dev)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ConfigError(f"unknown device {device!r} (auto, cpu, cuda)")
    rank = 0
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        rank = dist.get_rank()
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


def _all_sum(values: torch.Tensor, ctx: Dist) -> torch.Tensor:
    if ctx.world > 1:
        dist.all_reduce(values)
    return values


# --------------------------------------------------------------------------- checkpoints
def rng_states() -> dict:
    out = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, model, optimiser, epoch, history, convergence, extra) -> None:
    with atomic_path(path) as tmp:
        torch.save(plain({"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                          "epoch": epoch, "rng": rng_states(), "history": history,
                          "convergence": convergence, **extra}), tmp)


def load_checkpoint(path) -> dict:
    return load_plain(path, "checkpoint")


#: settings that may change between a run and its --resume: how long, where and how it runs
RESUMABLE_CHANGES = ("epochs", "device", "threads", "check_every")


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        elif hasattr(a, "tocsr"):  # a scipy sparse matrix
            a = a.tocsr()
            for part in (a.indptr, a.indices, a.data):
                h.update(np.ascontiguousarray(part).tobytes())
            continue
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def training_fingerprint(cfg: TrainConfig, tensors: dict, weight, pixel_weight, q, profile,
                         merge) -> dict:
    """What a checkpoint must share with this run to be resumed: every training setting but
    those of :data:`RESUMABLE_CHANGES`, and digests of the data (averages, orientations, weights,
    q, profile) and of the EMC merge operator (or its absence)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    data = _digest(*(tensors.get(k) for k in ("image", "counts", "quaternion", "log_gain",
                                              "weight", "log_scale")), weight, pixel_weight, q,
                   profile)
    return {**settings, "data": data,
            "emc_merge": None if merge is None else _digest(*merge)}


def fingerprint_changes(old: dict | None, new: dict) -> list[str]:
    """The keys that differ, as "key old -> new" (data digests named only); all for no old."""
    if old is None:
        return ["a checkpoint without a fingerprint"]
    out = []
    defaults = asdict(TrainConfig())
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key not in old and key in defaults and b == defaults[key]:
            continue  # a setting added since, at its default: what the old training did
        if a != b:
            out.append(key if key in ("data", "emc_merge", "extra") else f"{key} {a} -> {b}")
    return out


def save_model(path, model: SPIVAE, profile: np.ndarray, q: np.ndarray, extra: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(plain({"config": model.config, "state_dict": model.state_dict(),
                          "profile": np.asarray(profile), "q": np.asarray(q), **extra}), tmp)


def load_model(path, device="cpu") -> SPIVAE:
    """The trained VAE of model.pt."""
    blob = load_plain(path, "model")
    cfg = blob["config"]
    model = SPIVAE(q=np.asarray(blob["q"]), radial_log_profile=np.log(np.asarray(blob["profile"])),
                   **cfg)
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()


# --------------------------------------------------------------------------- checks
def fixed_latents(zdim: int) -> torch.Tensor:
    """Latent points where the convergence check decodes volumes: a line (zdim 1) or a 3^zdim
    grid over [-1.5, 1.5] of the prior."""
    ax = torch.linspace(-1.5, 1.5, 5 if zdim == 1 else 3)
    grids = torch.meshgrid(*([ax] * zdim), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def pearson(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


@torch.no_grad()
def encode(model: SPIVAE, tensors: dict, support, device, batch: int = 64):
    """mu, logvar (n, zdim) of the given averages (eval mode, no sampling)."""
    was = model.training
    model.eval()
    mus, lvs = [], []
    for s in range(0, tensors["image"].shape[0], batch):
        sl = slice(s, s + batch)
        mu, lv = model.encoder(tensors["image"][sl].to(device), support.to(device),
                               tensors["quaternion"][sl].to(device),
                               tensors["log_gain"][sl].to(device))
        mus.append(mu.float().cpu())
        lvs.append(lv.float().cpu())
    model.train(was)
    return torch.cat(mus).numpy(), torch.cat(lvs).numpy()


@torch.no_grad()
def convergence_check(model: SPIVAE, tensors, support, device, previous: dict | None) -> dict:
    """Volumes at fixed latent points and the data's mu, compared with the previous check:
    Pearson of log volumes (mean over the points) and of mu per latent dimension."""
    was = model.training
    model.eval()
    vols = torch.log(model.volumes(fixed_latents(model.zdim).to(device)).float()).cpu().numpy()
    model.train(was)
    mu, _ = encode(model, tensors, support, device)
    out = {"volumes": vols, "mu": mu, "volume_cc": float("nan"),
           "latent_pearson": [float("nan")] * mu.shape[1]}
    if previous is not None:
        out["volume_cc"] = float(np.mean([pearson(a, b) for a, b in
                                          zip(vols, previous["volumes"], strict=True)]))
        out["latent_pearson"] = [pearson(mu[:, k], previous["mu"][:, k])
                                 for k in range(mu.shape[1])]
    return out


# --------------------------------------------------------------------------- training
def make_scheduler(optimiser, cfg: TrainConfig):
    """Learning rate per epoch: constant, or a cosine from lr down to lr_final x lr at the last
    epoch. With a constant rate the decoder ends wherever the last minibatches left it, and the
    volumes (hence phased particle volumes) of two seeds differ by several per cent at the ends
    of the latent; the cosine lets them settle."""
    if cfg.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimiser, lambda epoch: 1.0)
    if cfg.lr_schedule == "cosine":
        if not 0.0 < cfg.lr_final <= 1.0:
            raise ConfigError(f"lr_final must be in (0, 1], got {cfg.lr_final}")
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimiser, T_max=max(cfg.epochs, 1), eta_min=cfg.lr * cfg.lr_final)
    raise ConfigError(f"learning-rate schedule must be constant or cosine, got "
                      f"{cfg.lr_schedule!r}")


def build_model(cfg: TrainConfig, image_size: int, q: np.ndarray, profile: np.ndarray) -> SPIVAE:
    return SPIVAE(cfg.zdim, cfg.volume_size, image_size, q, np.log(profile), cfg.point_group,
                  cfg.enc_channels, cfg.dec_channels, cfg.hidden, cfg.average_tilt,
                  cfg.learn_tilt)


def train(cfg: TrainConfig, tensors: dict, weight: np.ndarray, q: np.ndarray,
          profile: np.ndarray, out_dir, resume: bool = False, ctx: Dist | None = None,
          stop_after: int | None = None, pixel_weight: np.ndarray | None = None,
          merge=None) -> tuple[SPIVAE, dict]:
    """Train on ``tensors`` (from data.tensors); returns the model (unwrapped) and the history.

    ``weight`` (S, S) marks the pixels in the loss (the encoder's support channel);
    ``pixel_weight`` (S, S), default ``weight``, weighs them in the deviance. ``stop_after``
    ends after that many epochs of this call (tests of --resume). Checkpoint:
    ``out_dir/checkpoint.pt`` after every epoch. ``merge``: (points, matrix) of
    :func:`spiscape.vae.merge.merge_operator`, to predict the averages as the EMC merged them.
    """
    ctx = ctx or setup_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoint.pt"
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device = ctx.device
    image_size = tensors["image"].shape[-1]
    model = build_model(cfg, image_size, q, profile)
    if merge is not None:
        model.set_merge(*merge)
    model = model.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = make_scheduler(optimiser, cfg)
    history = {"epoch": [], "loss": [], "recon": [], "kl": [], "seconds": []}
    convergence = {"epoch": [], "volume_cc": [], "latent_pearson": []}
    previous = None
    start = 0
    resumed = {}
    fingerprint = training_fingerprint(cfg, tensors, weight, pixel_weight, q, profile, merge)
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        changed = fingerprint_changes(ck.get("fingerprint"), fingerprint)
        if ctx.world > 1:
            dist.barrier()  # every rank has read it before it may move
        if changed:
            # a rerun after a change of settings or inputs (the workflow always resumes): the old
            # training is kept aside, not continued as if it were this one
            stale = ckpt_path.with_name("checkpoint.stale.pt")
            if ctx.main:
                ckpt_path.replace(stale)
                log.warning("%s was made with other settings or data (%s); moved to %s, "
                            "training afresh", ckpt_path, "; ".join(changed), stale.name)
        else:
            resumed = ck
    elif resume:
        log.info("--resume: no checkpoint in %s, starting afresh", out_dir)
    if resumed:
        ck = resumed
        model.load_state_dict(ck["model"])
        optimiser.load_state_dict(ck["optimiser"])
        if "scheduler" in ck:
            scheduler.load_state_dict(ck["scheduler"])
        history, convergence, previous = ck["history"], ck["convergence"], ck.get("previous")
        start = int(ck["epoch"])
        set_rng_states(ck["rng"])
        log.info("resuming from %s after epoch %d", ckpt_path, start)
    net = model
    if ctx.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    per_average = tensors.get("weight")
    if per_average is None:
        per_average = torch.ones(tensors["image"].shape[0])
    n_avg = tensors["image"].shape[0]
    log_scale = tensors.get("log_scale")
    sized = log_scale is not None and bool(torch.any(log_scale != 0))
    if not sized:
        log_scale = torch.zeros(n_avg)
    dataset = TensorDataset(tensors["image"], tensors["counts"], tensors["quaternion"],
                            tensors["log_gain"], per_average.float(), torch.arange(n_avg),
                            log_scale.float())
    # pose refinement: a small rotation per average, learnt with its own Adam once the decoder
    # has a first volume (epoch pose_start), so that the poses do not chase a random one
    pose_delta = pose_opt = None
    if cfg.refine_poses:
        pose_delta = torch.zeros(n_avg, 3, device=device, requires_grad=True)
        pose_opt = torch.optim.Adam([pose_delta], lr=cfg.pose_lr)
        if "pose_delta" in resumed:
            with torch.no_grad():
                pose_delta.copy_(resumed["pose_delta"].to(device))
            pose_opt.load_state_dict(resumed["pose_optimiser"])
    sampler = DistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler)
    support = torch.as_tensor(weight, dtype=torch.float32).to(device)
    pix = support if pixel_weight is None else torch.as_tensor(
        pixel_weight, dtype=torch.float32).to(device)
    # an average sliced at exp(d) R q reads |q| up to exp(d) x the pixel's: its loss keeps the
    # pixels whose scaled |q| the volume still holds at any rotation (as loss_weight's bound)
    qnorm = torch.as_tensor(np.linalg.norm(np.asarray(q, dtype=np.float64).reshape(3, -1),
                                           axis=0), dtype=torch.float32, device=device)
    q_limit = float(cfg.volume_size // 2 - 1)
    use_bf16 = device.type == "cuda"
    meta = {"config": asdict(cfg), "profile": profile, "fingerprint": fingerprint}
    done = 0
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        model.train()
        for image, counts, quat, log_gain, wavg, idx, lsc in tqdm(
                loader, desc=f"epoch {epoch + 1}", leave=False,
                disable=None if ctx.main else True, mininterval=5):
            image, counts = image.to(device), counts.to(device)
            quat, log_gain, wavg = quat.to(device), log_gain.to(device), wavg.to(device)
            lsc = lsc.to(device) if sized else None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                delta = pose_delta[idx.to(device)] if pose_delta is not None else None
                pred, mu, logvar = net(image, support, quat, log_gain, pose_delta=delta,
                                       log_scale=lsc)
            pix_b = pix
            if sized:
                inside = qnorm[None] * torch.exp(lsc)[:, None] <= q_limit
                pix_b = pix.reshape(1, -1) * inside
            recon, _ = poisson_loss(pred, counts, pix_b)
            kl = kl_divergence(mu.float(), logvar.float())
            # per-average weights (mean 1 over the data, e.g. by frame count): noisy averages of
            # few frames pull less on the decoder
            loss = (wavg * (recon + cfg.kl_weight * kl)).mean()
            optimiser.zero_grad(set_to_none=True)
            if pose_opt is not None:
                pose_opt.zero_grad(set_to_none=True)
            loss.backward()
            if model.tilt is not None and epoch < cfg.pose_start:
                model.tilt.grad = None  # the angle waits for a first volume, as the poses do
            optimiser.step()
            if pose_opt is not None and epoch >= cfg.pose_start:
                if ctx.world > 1:  # each rank holds the gradients of its own averages only
                    dist.all_reduce(pose_delta.grad)
                pose_opt.step()
            n = image.shape[0]
            sums += torch.stack([loss.detach() * n, recon.detach().sum(), kl.detach().sum(),
                                 torch.tensor(float(n), device=device)]).double()
        scheduler.step()
        sums = _all_sum(sums, ctx).cpu().numpy()
        total, rec, kl_mean = sums[:3] / max(sums[3], 1)
        seconds = time.perf_counter() - t0
        for key, value in zip(("epoch", "loss", "recon", "kl", "seconds"),
                              (epoch + 1, total, rec, kl_mean, seconds), strict=True):
            history[key].append(float(value))
        line = (f"epoch {epoch + 1}/{cfg.epochs} loss {total:.5g} recon {rec:.5g} "
                f"kl {kl_mean:.4g} ({seconds:.1f} s, {sums[3] / seconds:.1f} averages/s)")
        if model.tilt is not None:
            line += f", tilt {model.tilt_deg():.2f} deg"
            history.setdefault("tilt_deg", []).append(model.tilt_deg())
        if cfg.check_every and ((epoch + 1) % cfg.check_every == 0 or epoch + 1 == cfg.epochs):
            check = convergence_check(model, tensors, support, device, previous)
            previous = {"volumes": check["volumes"], "mu": check["mu"]}
            convergence["epoch"].append(epoch + 1)
            convergence["volume_cc"].append(check["volume_cc"])
            convergence["latent_pearson"].append(check["latent_pearson"])
            line += (f"; vs previous check: volume CC {check['volume_cc']:.4f}, latent r "
                     + " ".join(f"{v:.3f}" for v in check["latent_pearson"]))
        if ctx.main:
            log.info(line)
            poses = {} if pose_opt is None else {
                "pose_delta": pose_delta.detach().cpu(), "pose_optimiser": pose_opt.state_dict()}
            save_checkpoint(ckpt_path, model, optimiser, epoch + 1, history, convergence,
                            {**meta, "previous": previous,
                             "scheduler": scheduler.state_dict(), **poses})
        if ctx.world > 1:
            dist.barrier()
        done += 1
        if stop_after is not None and done >= stop_after:
            break
    result = {"history": history, "convergence": convergence}
    if pose_opt is not None:
        result["pose_delta"] = pose_delta.detach().cpu().numpy().astype(np.float64)
    return model, result
