"""Amortised inference: each frame's pose, conformation and scale from one encoder pass.

A 2D CNN maps each sparse photon frame to H rotation hypotheses (6D) and a conformation z; the
VAE's symmetric 3D decoder turns z into an intensity volume, sliced on the Ewald sphere at the
frame's pose with the detector's geometry (solid angle, polarisation, mask, background) under a
Poisson likelihood with the frame's maximum-likelihood scale. Frames stream in blocks (memory
bounded by one block); checkpoint per epoch, --resume; DDP under torchrun, bf16 on a GPU. The
decoder starts from a trained VAE (--init-vae) or one volume (--init-volume, e.g. an emc3d model).
Writes amortise.h5 (per-frame quaternion, z, scale), volumes along z (volumes.h5 for spiscape
phase), MRC maps, figures and training.json.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from spiscape.utils.args import at_least, number_in, q_per_voxel_of

log = logging.getLogger(__name__)

OUTPUTS = {"out_dir": "folder"}

EXAMPLE = """\
spiscape amortise --photons data/photons.h5 --detector data/detector.h5 \\
    --init-vae vae/model.pt --landscape frames.h5 --out-dir amortise --epochs 20
spiscape amortise ... --init-volume emc3d/volumes.h5:0      # decoder from an emc3d model
torchrun --nproc-per-node 4 -m spiscape amortise ...        # DDP on 4 GPUs
"""


def add_args(parser):
    from spiscape.amortise.run import AmortiseConfig

    d = AmortiseConfig()
    parser.add_argument("--photons", nargs="+", required=True,
                        help="photon files (or a list file)")
    parser.add_argument("--detector", required=True, help="Dragonfly detector file")
    parser.add_argument("--out-dir", required=True,
                        help="folder for amortise.h5, model.pt, volumes.h5, maps/, figures")
    warm = parser.add_mutually_exclusive_group()
    warm.add_argument("--init-vae", default=None,
                      help="a trained VAE's model.pt: its decoder (and zdim, volume size, "
                           "radial profile) is the warm start")
    warm.add_argument("--init-volume", default=None, metavar="VOLUMES_H5[:K]",
                      help="a volumes file (vae or emc3d volumes.h5) and the index of the "
                           "volume the decoder starts from (default 0)")
    parser.add_argument("--landscape", default=None,
                        help="frames.h5 of the same photons: z is drawn against its "
                             "coordinates, and with --train-frames landscape it chooses the "
                             "frames trained on")
    parser.add_argument("--train-frames", choices=["landscape", "all"], default="landscape",
                        help="landscape: train on the frames the 2D route's VAE placed (its "
                             "clusters; contaminant clusters left out, so that they do not "
                             "take part of z), every frame without --landscape or a VAE "
                             "latent in it; all: every frame. Every frame is inferred either "
                             "way")
    parser.add_argument("--truth", default=None,
                        help="the simulator's truth.h5: scores into training.json and the q "
                             "scale of the maps")
    parser.add_argument("--q-per-pixel", type=number_in(0, low_open=True), default=None,
                        help="1/nm per detector pixel at the centre (the maps' q scale)")
    parser.add_argument("--epochs", type=at_least(1), default=d.epochs, help="passes over the "
                        "frames")
    parser.add_argument("--zdim", type=at_least(1), default=d.zdim,
                        help="conformation dimensions (from the VAE with --init-vae)")
    parser.add_argument("--hypotheses", type=at_least(1), default=d.hypotheses,
                        help="rotation hypotheses per frame (best-of-H loss)")
    parser.add_argument("--batch-size", type=at_least(1), default=d.batch_size,
                        help="frames per gradient step (per rank under torchrun)")
    parser.add_argument("--lr", type=number_in(0, low_open=True), default=d.lr,
                        help="Adam learning rate of the encoder")
    parser.add_argument("--decoder-lr", type=number_in(0), default=d.decoder_lr,
                        help="Adam learning rate of the decoder (0: frozen)")
    parser.add_argument("--kl-weight", type=number_in(0), default=d.kl_weight,
                        help="weight of the KL term (1: the ELBO)")
    parser.add_argument("--wta-relax", type=number_in(0, 1, high_open=True),
                        default=d.wta_relax,
                        help="share of the mean over hypotheses in the best-of-H loss")
    parser.add_argument("--block-frames", type=at_least(1), default=d.block_frames,
                        help="frames read at once (bounds the memory)")
    parser.add_argument("--volume-size", type=at_least(0), default=d.volume_size,
                        help="odd side of the decoded volumes (0: the warm start's, else from "
                             "the detector, at most 61)")
    parser.add_argument("--point-group", choices=["1", "-1", "m-3m"], default=d.point_group,
                        help="symmetry of the decoded volumes")
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction, default=d.refine,
                        help="after the encoder: local rotation search and the 1D z posterior")
    parser.add_argument("--num-volumes", type=at_least(2), default=11,
                        help="volumes decoded along z (volumes.h5, maps)")
    parser.add_argument("--seed", type=at_least(0), default=d.seed,
                        help="seed of the initial weights, the batches and the latent noise")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the model runs (auto: a GPU when torch sees one)")
    parser.add_argument("--threads", type=at_least(0), default=0,
                        help="torch CPU threads (0: torch's default)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from out-dir/checkpoint.pt (same data and settings)")
    parser.add_argument("--no-figures", action="store_true",
                        help="skip the figures (z against the landscape, poses, volumes, "
                             "training curve)")


def _init_volume(spec: str) -> np.ndarray:
    from spiscape.errors import InputError
    from spiscape.io.volumes import read_volumes

    path, _, index = spec.partition(":")
    if index and not index.isdigit():
        raise InputError(path, f"--init-volume: the volume index must be an integer, got "
                               f"{index!r}")
    return read_volumes(path, [int(index or 0)]).intens[0]


def main(args):
    import torch

    from spiscape.amortise import figures, run
    from spiscape.errors import InputError
    from spiscape.io import read_detector
    from spiscape.io.amortise import read_amortise
    from spiscape.io.maps import write_maps
    from spiscape.io.photons import PhotonDataset
    from spiscape.io.volumes import write_volumes
    from spiscape.io.weights import load_plain
    from spiscape.utils.atomic import atomic_path
    from spiscape.vae.analysis import latent_points

    cfg = run.AmortiseConfig(
        zdim=args.zdim, hypotheses=args.hypotheses, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, decoder_lr=args.decoder_lr,
        kl_weight=args.kl_weight, wta_relax=args.wta_relax, block_frames=args.block_frames,
        volume_size=args.volume_size, point_group=args.point_group, seed=args.seed,
        device=args.device, threads=args.threads, refine=args.refine)
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    det = read_detector(args.detector)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with PhotonDataset(args.photons, num_pix=det.num_pix) as dataset:
        vae_blob = load_plain(args.init_vae, "VAE model") if args.init_vae else None
        init_volume = _init_volume(args.init_volume) if args.init_volume else None
        warm = args.init_vae or args.init_volume or "none"
        landscape = select = None
        if args.landscape:
            from spiscape.io.frames import read_landscape

            landscape = read_landscape(args.landscape)
            if landscape["clpca"].shape[0] != dataset.num_frames:
                raise InputError(args.landscape, f"{landscape['clpca'].shape[0]} frames, the "
                                                 f"photons have {dataset.num_frames}")
            if args.train_frames == "landscape":
                select = run.landscape_frames(landscape, dataset.num_frames)
        if select is None:
            log.info("training on all %d frames", dataset.num_frames)
        else:
            log.info("training on the %d of %d frames the 2D route's VAE placed (the others, "
                     "e.g. contaminant clusters, are only inferred)", int(select.sum()),
                     select.size)
        model, pixels, profile = run.build(cfg, det, dataset, vae_blob, init_volume)
        log.info("%d frames, %d pixels in the likelihood, %d x %d encoder image, V = %d, "
                 "zdim %d, %d hypotheses, decoder from %s", dataset.num_frames,
                 pixels.index.size, pixels.image_size, pixels.image_size, cfg.volume_size,
                 cfg.zdim, cfg.hypotheses, warm)
        result = run.train(cfg, dataset, model, pixels, checkpoint=out / "checkpoint.pt",
                           resume=args.resume,
                           fingerprint=run.fingerprint(cfg, dataset.files, str(warm), select),
                           select=select)
        ctx = run.setup_distributed(cfg.device)
        if ctx.world > 1:  # inference and the outputs on rank 0 alone
            import torch.distributed as dist

            dist.destroy_process_group()
        if not ctx.main:
            return 0
        q_per_voxel = q_per_voxel_of(args.truth, args.q_per_pixel, args.detector)
        run.save_model(out / "model.pt", model, profile, {"amortise_config": result["config"]})
        run.infer(cfg, dataset, model, pixels, out / "amortise.h5", device=ctx.device,
                  attrs={"photons": json.dumps([str(p) for p in dataset.files]),
                         "detector": str(args.detector), "warm_start": str(warm)})
    frames = read_amortise(out / "amortise.h5")
    z, has_data = latent_points(frames["z"], args.num_volumes)
    with torch.no_grad():
        vols = model.volumes(torch.as_tensor(z, dtype=torch.float32, device=ctx.device))
    vols = vols.cpu().numpy()
    qn = pixels.qnorm
    write_volumes(out / "volumes.h5", z, vols, has_data, q_per_voxel, cfg.point_group,
                  {"q_min_measured": float(qn.min()), "q_max_measured": float(qn.max()),
                   "source": f"spiscape amortise {out}"})
    write_maps(out / "maps", vols, z, kind="intensity", voxel=q_per_voxel,
               source=f"spiscape amortise {out}")
    scores = {}
    if args.truth:
        from spiscape.amortise.scoring import score_against_truth

        scores = score_against_truth(frames, args.truth, model, qn, landscape)
    with atomic_path(out / "training.json") as tmp:
        trained_on = len(frames["z"]) if select is None else int(select.sum())
        tmp.write_text(json.dumps({**result, "warm_start": str(warm),
                                   "frames_trained_on": trained_on, "scores": scores},
                                  indent=1, default=float))
    if not args.no_figures:
        figures.all_figures(out, frames=frames, volumes=vols, z=z, has_data=has_data,
                            history=result["history"], landscape=landscape,
                            point_group=cfg.point_group)
    log.info("wrote %s (amortise.h5, model.pt, volumes.h5, %d MRC)%s", out, len(vols),
             "; scores " + json.dumps(scores, default=float) if scores else "")
    return 0

