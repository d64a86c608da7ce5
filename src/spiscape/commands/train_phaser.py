"""Train the neural phaser (3D U-Net on the Patterson map) on synthetic particle volumes.

The volumes come from spiscape's own particle shapes (cube, superball along the melt, sphere,
dimer, rod, spheroid) at random sizes, orientations, blurs, noise and measured q ranges
(spiscape.phasing.synth); the network and its input are described in spiscape.phasing.neural.
Settings come from --config (YAML: the keys of TrainPhaserConfig, with the synthetic-data keys
under ``synth:``), then the options given here. A checkpoint is written after every epoch
(--checkpoint, default OUT with .checkpoint.pt); --resume continues from it. Under torchrun the
training is DistributedDataParallel. The weights file holds the state dict, its SHA-256, the
settings and the loss history (read with torch.load(weights_only=True)); --figure draws the
training curve.

Unsupervised fine-tuning (--finetune VOLUMES.h5 --init MODEL.pt): the model adapts to a dataset's
own intensity volumes (a VAE's volumes.h5) by the physics loss alone, the misfit of the predicted
density's Fourier magnitudes to the measured amplitudes (AutoPhaseNN's loss; no truth needed),
for --epochs (default 20) at --lr (default 2e-4).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from pathlib import Path

from spiscape.errors import ConfigError, InputError
from spiscape.utils.args import at_least

log = logging.getLogger(__name__)

OUTPUTS = {"out": "file", "checkpoint": "file", "figure": "file", "history": "file"}

EXAMPLE = """\
spiscape train-phaser --out phaser61.pt --samples 4000 --epochs 8 --figure phaser61.png
torchrun --nproc-per-node 4 -m spiscape train-phaser --out phaser.pt --device cuda
"""


def add_args(parser):
    parser.add_argument("--out", required=True, help="output weights file (.pt)")
    parser.add_argument("--config", default=None, help="YAML settings (TrainPhaserConfig keys)")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint written every epoch (default: OUT with .checkpoint.pt)")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--samples", type=at_least(1), default=None,
                        help="training volumes (default 4000)")
    parser.add_argument("--validation", type=at_least(1), default=None,
                        help="validation volumes (default 200)")
    parser.add_argument("--epochs", type=at_least(1), default=None, help="epochs (default 8)")
    parser.add_argument("--batch-size", type=at_least(1), default=None, help="default 8")
    parser.add_argument("--lr", type=float, default=None, help="Adam learning rate (2e-3)")
    parser.add_argument("--grid", type=at_least(16), default=None,
                        help="side of the phasing grid the volumes are made on (default 61)")
    parser.add_argument("--seed", type=at_least(0), default=None, help="default 1")
    parser.add_argument("--device", default=None, help="auto, cpu or cuda (default auto)")
    parser.add_argument("--threads", type=at_least(0), default=None,
                        help="torch CPU threads (0: torch's default)")
    parser.add_argument("--finetune", default=None,
                        help="fine-tune --init on these intensity volumes (volumes.h5)")
    parser.add_argument("--init", default=None, help="the model to fine-tune (default: shipped)")
    parser.add_argument("--figure", default=None, help="training curve (.png)")
    parser.add_argument("--history", default=None, help="loss history (.json)")


def load_config(path, overrides: dict):
    """TrainPhaserConfig from a YAML file and option overrides; ConfigError naming an unknown
    or mistyped key."""
    import yaml

    from spiscape.phasing.synth import SynthSettings
    from spiscape.phasing.training import TrainPhaserConfig

    data = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise InputError(path, "no such file") from None
        except yaml.YAMLError as exc:
            raise InputError(path, f"not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise InputError(path, "expected a mapping of settings")
    synth_data = data.pop("synth", {}) or {}
    grid = overrides.pop("grid", None)
    if grid is not None:
        synth_data["grid"] = grid
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name: f for f in fields(TrainPhaserConfig)}
    synth_known = {f.name: f for f in fields(SynthSettings)}
    for key in data:
        if key not in known:
            raise ConfigError(f"train-phaser setting {key!r} is unknown (known: "
                              f"{', '.join(sorted(known))})")
    for key in synth_data:
        if key not in synth_known:
            raise ConfigError(f"train-phaser setting synth.{key!r} is unknown (known: "
                              f"{', '.join(sorted(synth_known))})")
    try:
        synth = SynthSettings(**{k: (tuple(v) if isinstance(v, list) else v)
                                 for k, v in synth_data.items()})
        cfg = TrainPhaserConfig(synth=synth, **{k: (tuple(v) if isinstance(v, list) else v)
                                                 for k, v in data.items() if k != "synth"})
    except TypeError as exc:
        raise ConfigError(f"train-phaser settings: {exc}") from None
    return cfg.check()


def main(args):
    from spiscape.phasing.training import train

    if args.finetune:
        return finetune_main(args)
    overrides = {"samples": args.samples, "validation": args.validation, "epochs": args.epochs,
                 "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                 "device": args.device, "threads": args.threads, "grid": args.grid}
    cfg = load_config(args.config, overrides)
    checkpoint = args.checkpoint or str(Path(args.out).with_suffix(".checkpoint.pt"))
    log.info("training the neural phaser: %d volumes on a %d^3 grid, %d epochs, widths %s",
             cfg.samples, cfg.synth.grid, cfg.epochs, list(cfg.widths))
    history = train(cfg, args.out, checkpoint=checkpoint, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 writes
        return 0
    if args.history:
        Path(args.history).write_text(json.dumps({"settings": cfg.as_dict(),
                                                  "history": history}, indent=1))
    if args.figure:
        _curve(args.figure, history)
    log.info("neural phaser -> %s (final validation loss %.3g)", args.out,
             history["validation_loss"][-1])
    return 0


def finetune_main(args):
    from spiscape.io.volumes import read_volumes
    from spiscape.phasing import measured_shell_mask
    from spiscape.phasing.neural import load_phaser, write_weights
    from spiscape.phasing.training import finetune

    phaser = load_phaser(args.init)
    stored = read_volumes(args.finetune)
    q_min = stored.q_min_measured or 0.0
    q_max = stored.q_max_measured or float("inf")
    measured = measured_shell_mask(stored.intens.shape[1:], q_min, q_max)
    log.info("fine-tuning %s on %d volumes of %s (physics loss)", phaser.path,
             stored.intens.shape[0], args.finetune)
    history = finetune(phaser.model, stored.intens, measured, epochs=args.epochs or 20,
                       lr=args.lr or 2e-4, seed=args.seed if args.seed is not None else 1)
    settings = dict(phaser.settings, finetuned_on=str(args.finetune), finetuned_from=phaser.path,
                    finetune_loss=history)
    write_weights(args.out, phaser.model, settings)
    if args.history:
        Path(args.history).write_text(json.dumps({"finetune_loss": history}, indent=1))
    log.info("physics loss %.4g -> %.4g; fine-tuned phaser -> %s", history[0], history[-1],
             args.out)
    return 0


def _curve(path, history):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(history["epoch"], history["train_loss"], "o-", label="training")
    ax.plot(history["epoch"], history["validation_loss"], "s-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("twin-invariant MSE (density, max 1)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("neural phaser training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
