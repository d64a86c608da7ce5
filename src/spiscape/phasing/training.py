"""Training of the neural phaser (``spiscape train-phaser``) on synthetic volumes.

The training set is ``samples`` volumes of :mod:`.synth` (seed ``seed``), the validation set
``validation`` volumes of seed ``seed + 1``; each is turned into the network's input
(:func:`~spiscape.phasing.neural.patterson_features`) and target (the blurred density's window)
once, in memory. Every batch is turned by a random operation of the cube's point group (axis
permutation and flips, applied to input and target alike: the Patterson window transforms like
the density). Adam with a cosine learning-rate schedule on the twin-invariant MSE.

Under torchrun (WORLD_SIZE > 1) every rank makes and trains on its share of the samples inside
DistributedDataParallel (nccl on GPUs, gloo on CPUs); bf16 autocast on a GPU. A checkpoint after
every epoch holds the model, the optimiser, the RNG states, the history and the settings;
``--resume`` continues from it (refused when the settings that shape the result differ). The
weights file is written at the end (keys in :mod:`.neural`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from itertools import permutations, product

import numpy as np
import torch
from tqdm import tqdm

from spiscape.errors import ConfigError, InputError
from spiscape.io.weights import load_plain, plain
from spiscape.phasing.neural import PhaserNet, patterson_features, twin_loss, write_weights
from spiscape.phasing.synth import SynthSettings, sample
from spiscape.utils.atomic import atomic_path
from spiscape.vae.model import apply_operation
from spiscape.vae.train import rng_states, set_rng_states, setup_distributed

log = logging.getLogger(__name__)

#: settings that may change between a run and its --resume
RESUMABLE_CHANGES = ("epochs", "device", "threads")


@dataclass
class TrainPhaserConfig:
    synth: SynthSettings = field(default_factory=SynthSettings)
    widths: tuple[int, ...] = (16, 32, 64)
    samples: int = 4000
    validation: int = 200
    epochs: int = 8
    batch_size: int = 8
    lr: float = 2e-3
    lr_final: float = 0.05  # of lr, at the end of the cosine schedule
    seed: int = 1
    device: str = "auto"
    threads: int = 0  # torch CPU threads (0: torch's default)

    def check(self) -> TrainPhaserConfig:
        self.synth.check()
        for name in ("samples", "validation", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr: must be positive, got {self.lr}")
        if any(int(w) < 16 or int(w) % 8 for w in self.widths):
            raise ConfigError(f"widths: multiples of 8, at least 16 (got {list(self.widths)}; "
                              "narrower 3D convolutions take a slow path on CPUs)")
        return self

    def as_dict(self) -> dict:
        out = asdict(self)
        out["synth"] = self.synth.as_dict()
        out["widths"] = list(self.widths)
        return out


def make_set(cfg: TrainPhaserConfig, seed: int, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (n, 3, W, W, W) and targets (n, W, W, W) of the synthetic samples ``indices``."""
    from spiscape.phasing.neural import centred_window, window_half

    xs, ys = [], []
    h = window_half(cfg.synth.grid)
    for i in tqdm(indices, desc=f"making volumes (seed {seed})", unit="vol", leave=False,
                  mininterval=5.0):
        s = sample(cfg.synth, seed, int(i))
        xs.append(patterson_features(s.intens, s.measured))
        ys.append(centred_window(s.density, h, 1))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.float32))


#: the 48 operations of m-3m as (axis permutation, flipped axes), in the order the shipped
#: model's augmentation drew them by index
_OPERATIONS = [(perm, tuple(a for a, f in enumerate(flips) if f))
               for perm in permutations((0, 1, 2)) for flips in product((False, True), repeat=3)]


def turn(x: torch.Tensor, y: torch.Tensor, op) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a cube operation (permutation, flipped axes) to inputs (b, c, W^3) and targets
    (b, W^3): the VAE's point-group operation on the last three axes (odd W)."""
    return (apply_operation(x, *op).contiguous(), apply_operation(y, *op).contiguous())


def _save(path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(plain(payload), tmp)


def _lr_at(cfg: TrainPhaserConfig, step: int, total: int) -> float:
    u = min(step / max(total, 1), 1.0)
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + np.cos(np.pi * u)))


def _check_resume(saved: dict, cfg: TrainPhaserConfig, path) -> None:
    now = cfg.as_dict()
    diff = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if diff:
        raise InputError(path, f"checkpoint made with other settings ({', '.join(diff)}); "
                         "start afresh without --resume or use the same settings")


def evaluate(model, x: torch.Tensor, targets, device, batch: int, loss=twin_loss) -> float:
    """Mean ``loss(model(x), *targets)`` over a set, in batches, without gradients; the model is
    left in training mode."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            xb = x[i:i + batch].to(device)
            tb = [t[i:i + batch].to(device) for t in targets]
            total += float(loss(model(xb).float(), *tb)) * xb.shape[0]
    model.train()
    return total / max(x.shape[0], 1)


def train(cfg: TrainPhaserConfig, out, checkpoint=None, resume: bool = False) -> dict:
    """Train, checkpointing every epoch; write the weights file ``out``; return the history."""
    cfg.check()
    ctx = setup_distributed(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + ctx.rank)
    model = PhaserNet(cfg.widths).to(ctx.device)
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history = {"epoch": [], "train_loss": [], "validation_loss": [], "seconds": []}
    first = 0
    if resume and checkpoint is not None:
        try:
            state = load_plain(checkpoint, "phaser checkpoint")
        except InputError:
            state = None
            log.warning("no readable checkpoint at %s: starting afresh", checkpoint)
        if state is not None:
            _check_resume(state["settings"], cfg, checkpoint)
            model.load_state_dict(state["model"])
            optimiser.load_state_dict(state["optimiser"])
            set_rng_states(state["rng"])
            history = {k: list(v) for k, v in state["history"].items()}
            first = int(state["epoch"])
            log.info("resumed from %s after epoch %d", checkpoint, first)
    net = model
    if ctx.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    train_x, train_y = make_set(cfg, cfg.seed, range(ctx.rank, cfg.samples, ctx.world))
    val_x, val_y = make_set(cfg, cfg.seed + 1, range(cfg.validation))
    n = train_x.shape[0]
    steps_per_epoch = max(n // cfg.batch_size, 1)
    total = steps_per_epoch * cfg.epochs
    autocast = ctx.device.type == "cuda"
    for epoch in range(first, cfg.epochs):
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1009 + ctx.rank)
        order = torch.randperm(n, generator=gen)
        ops = torch.randint(len(_OPERATIONS), (steps_per_epoch,), generator=gen)
        running = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not ctx.main, mininterval=5.0)
        for step in bar:
            for group in optimiser.param_groups:
                group["lr"] = _lr_at(cfg, epoch * steps_per_epoch + step, total)
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            xb, yb = turn(train_x[idx], train_y[idx], _OPERATIONS[int(ops[step])])
            xb, yb = xb.to(ctx.device), yb.to(ctx.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                pred = net(xb)
            loss = twin_loss(pred.float(), yb)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            running += float(loss.detach())
        train_loss = running / steps_per_epoch
        if ctx.world > 1:
            value = torch.tensor([train_loss], device=ctx.device)
            torch.distributed.all_reduce(value)
            train_loss = float(value) / ctx.world
        val_loss = evaluate(model, val_x, (val_y,), ctx.device, cfg.batch_size)
        seconds = time.perf_counter() - start
        for key, value in (("epoch", epoch + 1), ("train_loss", train_loss),
                           ("validation_loss", val_loss), ("seconds", seconds)):
            history[key].append(value)
        if ctx.main:
            log.info("epoch %d/%d: train loss %.3g, validation loss %.3g, %.0f s", epoch + 1,
                     cfg.epochs, train_loss, val_loss, seconds)
            if checkpoint is not None:
                _save(checkpoint, {"model": model.state_dict(),
                                   "optimiser": optimiser.state_dict(), "epoch": epoch + 1,
                                   "rng": rng_states(), "history": history,
                                   "settings": cfg.as_dict()})
    if ctx.main:
        write_weights(out, model, cfg.as_dict(), history=history)
    return history


# --------------------------------------------------------------------------- fine-tuning
def physics_loss(window: torch.Tensor, amp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the relative amplitude misfit on the measured voxels,
    ||s |F(rho)| - sqrt(I)||^2 / ||sqrt(I)||^2 with the scale s fitted in closed form, rho the
    predicted window placed on the N^3 grid (``amp`` and ``mask`` in fftn order, (b, N, N, N)).

    Magnitudes do not see shifts or the twin; positivity and the support (the window) are
    built into the network's output. AutoPhaseNN's unsupervised loss, without truth."""
    n = amp.shape[-1]
    w = window.shape[-1]
    lo = n // 2 - w // 2
    grid = torch.zeros(window.shape[0], n, n, n, dtype=window.dtype, device=window.device)
    grid[:, lo:lo + w, lo:lo + w, lo:lo + w] = window
    mag = torch.fft.fftn(torch.fft.ifftshift(grid, dim=(1, 2, 3)), dim=(1, 2, 3)).abs()
    mag, target = mag * mask, amp * mask
    scale = (mag * target).sum(dim=(1, 2, 3)) / (mag * mag).sum(dim=(1, 2, 3)).clamp_min(1e-30)
    misfit = ((scale[:, None, None, None] * mag - target) ** 2).sum(dim=(1, 2, 3))
    return (misfit / (target * target).sum(dim=(1, 2, 3)).clamp_min(1e-30)).mean()


def finetune(model: PhaserNet, intens: np.ndarray, measured: np.ndarray, epochs: int = 20,
             lr: float = 2e-4, batch_size: int = 2, seed: int = 1) -> list[float]:
    """Adapt a trained phaser to a dataset's own volumes ``intens (K, N, N, N)`` (unmeasured:
    ``measured`` False or NaN) by the physics loss alone; returns the loss per epoch (the first
    entry before any update)."""
    from spiscape.phasing.algorithms import amplitudes_and_mask

    torch.manual_seed(seed)
    feats, amps, masks = [], [], []
    for vol in intens:
        amp, mask = amplitudes_and_mask(vol, measured)
        feats.append(patterson_features(vol, mask))
        amps.append(np.fft.ifftshift(amp))
        masks.append(np.fft.ifftshift(mask))
    x = torch.from_numpy(np.stack(feats))
    amp = torch.from_numpy(np.stack(amps).astype(np.float32))
    mask = torch.from_numpy(np.stack(masks).astype(np.float32))
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)

    def loss_of_all() -> float:
        return evaluate(model, x, (amp, mask), "cpu", batch_size, loss=physics_loss)

    history = [loss_of_all()]
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = physics_loss(model(x[idx]), amp[idx], mask[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        history.append(loss_of_all())
        log.info("fine-tuning epoch %d/%d: physics loss %.4g", epoch + 1, epochs, history[-1])
    model.eval()
    return history
