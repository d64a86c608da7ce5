"""Train the VAE that turns 2D class averages into 3D intensities along a continuous latent.

The SPIEncoder of Zhuang, Ayyer et al. (IUCrJ 2022). A 2D CNN encodes each average (divided by
its gain and by the dataset's radial mean intensity, then log), with its orientation quaternion
and log gain concatenated to the CNN features, into a latent z (mean and log variance). A decoder
turns z into a V^3 intensity volume (fully connected, then 3D transposed convolutions; log
intensity relative to the radial mean profile, so positive), averages it over the point group
(m-3m: the 48 axis permutations and sign flips), and slices it on the Ewald sphere at the
average's orientation (trilinear, differentiable). The loss is the Poisson deviance of the
average given the slice times a per-average scale fitted in closed form, on the measured pixels
inside the volume, plus kl_weight * KL(q(z|x) || N(0, 1)).

Outputs in --out-dir: model.pt, checkpoint.pt (every epoch; --resume continues from it),
latent.h5 (mu, logvar of every average), volumes.h5 (z, intens at --num-volumes points spanning
the latent range, has_data), volumes/intensity_*.mrc (reciprocal space) with z_values.txt,
training.json (loss and convergence history, scores), figures (volumes.png, latent_hist.png,
loss.png, convergence.png; frame_sizes.png with --frame-poses global), and with --replicates
frame_latent.h5 (per-frame latents, NaN where a frame is in no trained average: with --photons each
frame's posterior mean under the decoder, spiscape.vae.frame_posterior; else the mean latent of
its classes' averages).
Under torchrun the training is DistributedDataParallel (nccl on GPU, gloo on CPU); rank 0 writes.

Pose refinement (--refine-poses): each average trained on gets a small rotation (axis-angle,
its own Adam from epoch --pose-start) composed with its orientation when it is sliced; latent.h5
then also holds quaternion_refined (A, 4) and pose_change_deg (A,). The encoder keeps seeing the
input orientation, so that new averages encode without refinement.

EMC merge (--emc-merge, needs --replicates): each predicted average is the volume sliced at
every merged detector pixel rotated to every in-plane angle of the 2D EMC and back-projected as
its M-step does (spiscape.vae.merge), not a plain slice: the merge blurs steep fall-offs by
about half a pixel (what it changes on the demo: docs/benchmarks.md).

Size correction (--size-correction commonlines, needs --commonlines and --embedding): each
average trained on is sliced at exp(d) R q, d its log size against the frame-weighted mean of
the averages of its landscape cluster, read from the common lines' size search (commonlines.h5
``scales``); a population's size spread is then not carried by the latent and it decodes at its
frame-weighted mean size (docs/methods.md, "Size correction").

Misfits (--drop-misfits Z): the first training goes to out-dir/first_pass/; the averages
trained on whose misfit under its decoder (relative squared residual at their own latent,
orientation and size) lies more than Z robust standard deviations above the others' are left
out (spiscape.vae.misfit: a species beside the series that the clusters let in), and the VAE is
trained again without them in out-dir; training.json's scores say how many ("misfits_dropped").

Selection and weighting: --clusters auto trains on the embedding's clusters that lie on the
landscape's main axis (its ends the two clusters holding the most frames, the end states of a
structural series such as cube ... sphere; on it, the clusters whose centroids detour from the
segment between the ends' by at most --max-detour) and hold at least --min-cluster-fraction of
the frames; a contaminant species lies off to the side, a melting series cut into clusters does
not (the others are still encoded); --frame-weighting sqrt weights each average's loss by the
square root of its frame count; --q-min drops the partly shadowed pixels at the beamstop's
edge from the loss.

Scores with --truth (training.json "scores"): |Spearman| of mu[0] with each average's true t
(occupancy-weighted over its frames) over the cube/melting/sphere averages; and the shell
correlation of the volume decoded at the pure-cube latent (the mean mu of the averages whose
frames are >= 80 % cubes; else the 3 most cube-like) with the true cube, best of its 24 rotations,
in 1-voxel shells from the smallest |q| in the loss (outside the beamstop: inside it the volume
is extrapolated) to 0.7 x the largest. The reference is the truth cube averaged over the sizes of
the data's cube frames (s^6 I(s q)): a size spread blurs fringe minima in the data themselves, so
no reconstruction can match the nominal cube there; the nominal score is kept alongside.
"""

from __future__ import annotations

import argparse
import json
import logging
from functools import partial
from pathlib import Path

import numpy as np

from spiscape.errors import ConfigError, InputError
from spiscape.io import volumes as volumes_io
from spiscape.io.commonlines import read_pair_scales
from spiscape.io.maps import write_maps
from spiscape.utils.args import at_least, auto_or_number, number_in
from spiscape.utils.atomic import atomic_path
from spiscape.vae import scoring

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out_dir": "folder", "figure_dir": "folder"}

#: shown under "Example" in ``spiscape vae -h``
EXAMPLE = """\
spiscape vae --averages averages.h5 --orientation orientation.h5 \\
    --detector data/detector.h5 --embedding embedding.h5 \\
    --replicates emc/rep0.h5 emc/rep1.h5 --q-per-pixel 0.0055 --out-dir vae/
"""


def add_args(parser):
    g = parser.add_argument_group("inputs")
    g.add_argument("--averages", required=True, help="averages.h5 (intens, support, ...)")
    g.add_argument("--orientation", required=True,
                   help="orientation.h5 (quaternion (A, 4) scalar first, gain (A,))")
    g.add_argument("--detector", required=True, help="detector file (for detd and ewald_rad)")
    g.add_argument("--out-dir", required=True, help="output folder, e.g. results/{ds}/vae")
    g.add_argument("--embedding", default=None,
                   help="embedding.h5: with --clusters, train only on those clusters' averages")
    g.add_argument("--clusters", default="all",
                   help="'all', 'auto' (the clusters on the landscape's main axis, see "
                        "--max-detour and --min-cluster-fraction) or cluster "
                        "numbers (e.g. '0 2') to train on; needs --embedding")
    g.add_argument("--min-cluster-fraction", type=number_in(0, 1, high_open=True), default=0.01,
                   help="with --clusters auto: smallest share of the frames a cluster must "
                        "hold to be trained on")
    g.add_argument("--max-detour", type=number_in(1), default=1.25,
                   help="with --clusters auto: a cluster c is on the main axis between the "
                        "two clusters a, b holding the most frames when "
                        "(|a - c| + |c - b|) / |a - b| of the centroids is at most this; 1.25 "
                        "allows a centroid 0.375 |a - b| off the axis at its middle")
    g.add_argument("--commonlines", default=None,
                   help="commonlines.h5 (its size search's pairwise scales), for "
                        "--size-correction commonlines")
    g.add_argument("--replicates", nargs="+", default=None,
                   help="classify2d rep*.h5: write the per-frame latents frame_latent.h5")
    g.add_argument("--photons", nargs="+", default=None,
                   help="the dataset's photon files: with --replicates, each frame's latent is "
                        "its own posterior under the decoder (--frame-latent)")
    g.add_argument("--frame-latent", default="auto", choices=["auto", "posterior", "classes"],
                   help="per-frame latents: 'posterior' (each frame's photons scored against "
                        "the decoder at its candidate classes' orientations; needs --photons), "
                        "'classes' (the mean latent of its classes' averages); auto: posterior "
                        "when --photons is given")
    g.add_argument("--frame-latent-points", type=at_least(3), default=21,
                   help="latent grid points of the per-frame posterior (zdim 2: a grid of "
                        "about this many)")
    g.add_argument("--frame-size-range", type=number_in(0, 0.5), default=0.08,
                   help="the per-frame posterior sums over the frame's size from 1 - r to 1 + r "
                        "times its class's (--frame-poses classes) or the decoded volume's "
                        "(global) in --frame-size-steps steps (0: that size only)")
    g.add_argument("--frame-size-steps", type=at_least(2), default=9,
                   help="size steps over that range (9: 2 %% apart at r = 0.08; against 5, "
                        "rho and Somers' D rose on every set of the matrix, at about twice "
                        "the per-frame time, docs/validation.md)")
    g.add_argument("--frame-poses", default="global", choices=["global", "classes"],
                   help="per-frame posterior: the frame's orientation searched over a grid of "
                        "all orientations (global; --frame-pose-step) or over its candidate "
                        "classes' orientations, at the EMC's in-plane angles and --frame-tilt")
    g.add_argument("--frame-pose-step", type=number_in(4, 30), default=8.0,
                   help="spacing (degrees) of the global orientation grid (its asymmetric unit "
                        "under --point-group: 1211 orientations for m-3m at 8, 4957 at 5; the "
                        "memory is 8 bytes x latent points x orientations x pixels, 0.4 GB at 8 "
                        "for 2000 pixels; 5 gave the same latents as 8 on the matrix)")
    g.add_argument("--frame-refine", type=at_least(0), default=1,
                   help="(--frame-poses global) EM iterations of the volumes at the latent "
                        "points from the frames themselves before the final posterior: each "
                        "volume re-estimated from the frames' photons, weighted by their "
                        "posterior over latent point, orientation and size (the multiplicative "
                        "maximum-likelihood update through the slices); the decoder learnt them "
                        "from class averages, which mix neighbouring shapes. Each iteration "
                        "costs about three posteriors; 0: the decoder's volumes")
    g.add_argument("--volumes-from", default="decoder", choices=["decoder", "frames"],
                   help="the volumes along the latent that volumes.h5 (and so the phasing, "
                        "the maps and the volume curve) holds: the decoder's, or those refined "
                        "from the frames (needs --frame-refine >= 1, --frame-poses global, "
                        "--photons), read between the refinement's latent points. The refined "
                        "ones resolve part of a population's size spread (sharper fringe "
                        "minima, nearer one particle's intensity); against the size-averaged "
                        "truth the matrix scores them lower on 5 of 8 sets (docs/validation.md)")
    g.add_argument("--frame-tilt", type=auto_or_number(0), default="auto",
                   help="the per-frame posterior also sums over tilts of the frame's "
                        "orientation out of the detector plane: a ring of 4 at this angle "
                        "(degrees) about the class's (0: the class's orientation only); auto: "
                        "of 0, 4, ..., 24 the one under which the frames of 8 trained "
                        "classes drawn at random are most probable")
    g.add_argument("--num-frames", type=at_least(1), default=None,
                   help="frames in the dataset (default: the largest frame index + 1)")
    g.add_argument("--truth", default=None,
                   help="truth.h5 of a simulated dataset: q per voxel, and score the latent and "
                        "the cube volume against the truth")
    g.add_argument("--q-per-pixel", type=number_in(0, low_open=True), default=None,
                   help="q per voxel (1/nm) to record in volumes.h5 and the MRC headers")
    m = parser.add_argument_group("model and training")
    m.add_argument("--zdim", type=at_least(1), default=1,
                   help="latent dimension (the paper: 1 or 2)")
    m.add_argument("--volume-size", type=at_least(1), default=61,
                   help="V, odd: side of the decoded volume in voxels (paper: 81, 161, 243)")
    m.add_argument("--point-group", default="m-3m", choices=["1", "-1", "m-3m"],
                   help="symmetry imposed on the volumes (1: none)")
    m.add_argument("--epochs", type=at_least(1), default=300,
                   help="passes over the averages (more extend a --resume'd run); at 100 the "
                        "decoder still lagged the averages' fringes (docs/validation.md)")
    m.add_argument("--batch-size", type=at_least(1), default=8,
                   help="averages per optimiser step (per process under torchrun)")
    m.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    m.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"],
                   help="learning rate over the epochs: cosine decay to --lr-final x lr, or "
                        "constant")
    m.add_argument("--lr-final", type=float, default=0.05,
                   help="final learning rate as a fraction of --lr (cosine schedule)")
    m.add_argument("--kl-weight", type=float, default=0.001,
                   help="beta: weight of the KL term against the per-pixel mean Poisson "
                        "deviance (0.001: checked on the validation matrix; 0.01 let the latent "
                        "collapse where the deviance per pixel is small, e.g. few photons)")
    m.add_argument("--frame-weighting", default="none", choices=["none", "sqrt", "frames"],
                   help="weight of each average in the loss: equal, or growing with its frame "
                        "count (sqrt or linear) so that noisy near-empty classes matter less")
    m.add_argument("--q-min", type=auto_or_number(minimum=0.0), default=0.0,
                   help="smallest |q| (detector pixels) in the loss: pixels at the edge of the "
                        "beamstop are partly shadowed and read too low (e.g. the beamstop "
                        "radius); 'auto': the beamstop's edge read from the detector mask (the "
                        "smallest |q| of a used pixel); the volume inside is extrapolated "
                        "either way")
    m.add_argument("--q-step", type=auto_or_number(minimum=1.0), default=1.0,
                   help="detector pixels per voxel of the volume grid (q per voxel = this x q "
                        "per pixel): 1 keeps the detector's sampling, so a V^3 grid sees |q| up "
                        "to V // 2 - 1 pixels; 'auto': as coarse as needed for the grid to span "
                        "the averages' measured pixels (at least 1)")
    m.add_argument("--radial-weighting", type=float, default=0.5,
                   help="alpha: pixels weigh I_0(|q|)^-alpha in the Poisson deviance (0: plain "
                        "Poisson, high q barely counts; 1: every shell by its relative misfit); "
                        "0.5 offsets the blur of merged EMC averages, sharpened ones "
                        "(classify2d --sharpen-iterations) want 0, as the pipeline uses")
    m.add_argument("--refine-poses", action=argparse.BooleanOptionalAction, default=False,
                   help="learn a small rotation per average on top of its orientation (pose "
                        "refinement, as cryoDRGN's); latent.h5 gets the refined quaternions")
    m.add_argument("--pose-lr", type=number_in(0, low_open=True), default=1e-3,
                   help="Adam learning rate of the pose corrections (radians)")
    m.add_argument("--pose-start", type=at_least(0), default=10,
                   help="epoch from which the poses are refined (the decoder needs a first "
                        "volume to align to)")
    m.add_argument("--size-correction", default="none", choices=["none", "commonlines"],
                   help="commonlines: slice each average at its own particle size, its log size "
                        "against its landscape cluster's (frame-weighted) read from the common "
                        "lines' size search (needs --commonlines and --embedding), so that a "
                        "population's size spread is not carried by the latent; none: one "
                        "size per latent point")
    m.add_argument("--average-tilt", type=auto_or_number(0), default=0,
                   help="predict each average as the mean of its slice and a ring of 4 slices "
                        "tilted by this angle (degrees) out of its plane: the patch of "
                        "orientations a 2D class merges (0: one slice); auto: the angle is fitted "
                        "with the decoder from --pose-start on, starting at "
                        "8 degrees")
    m.add_argument("--emc-merge", action=argparse.BooleanOptionalAction, default=False,
                   help="predict each average as the 2D EMC merged it (bilinear back-projection "
                        "at its in-plane angles, from the --replicates' geometry) instead of as "
                        "a plain slice (needs --replicates)")
    m.add_argument("--seed", type=at_least(0), default=1,
                   help="seed of the initial weights, the batches and the latent sampling")
    m.add_argument("--device", default="auto", help="auto, cpu or cuda")
    m.add_argument("--threads", type=at_least(1), default=1,
                   help="CPU threads of torch (on a shared 2-core box one thread was 20x faster "
                        "than two: OpenMP threads spin against other jobs)")
    m.add_argument("--check-every", type=at_least(1), default=5,
                   help="epochs between convergence checks")
    m.add_argument("--dec-channels", type=at_least(1), default=32,
                   help="decoder channels at the base")
    m.add_argument("--enc-channels", type=at_least(1), default=16,
                   help="encoder channels, first layer")
    m.add_argument("--resume", action="store_true",
                   help="continue from out-dir/checkpoint.pt if it was made with the same "
                        "settings and data (else it is moved to checkpoint.stale.pt and "
                        "training starts afresh); more --epochs extend it")
    m.add_argument("--drop-misfits", type=number_in(0, low_open=True), default=None,
                   metavar="Z",
                   help="after training, leave out the averages trained on whose misfit under "
                        "the decoder (relative squared residual at their own latent, "
                        "orientation and size) lies more than Z robust standard deviations "
                        "above the others', and train again without them: a species the "
                        "clusters let in (spiscape.vae.misfit); off by default")
    m.add_argument("--num-volumes", type=at_least(1), default=11,
                   help="volumes written along the latent (zdim 2: a grid of about this many)")
    m.add_argument("--no-figures", action="store_true", help="skip the figures")
    m.add_argument("--figure-dir", default=None,
                   help="folder for the figures (default: --out-dir)")


def config_from_args(args):
    from spiscape.vae.train import TrainConfig, tilt_settings

    if args.volume_size < 9 or args.volume_size % 2 == 0:
        raise ConfigError(f"--volume-size must be odd and >= 9, got {args.volume_size}")
    tilt = tilt_settings(args.average_tilt)
    return TrainConfig(zdim=args.zdim, volume_size=args.volume_size, point_group=args.point_group,
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       kl_weight=args.kl_weight, seed=args.seed, device=args.device,
                       check_every=args.check_every, enc_channels=args.enc_channels,
                       dec_channels=args.dec_channels, threads=args.threads,
                       frame_weighting=args.frame_weighting,
                       q_min=0.0 if args.q_min == "auto" else args.q_min,
                       radial_weighting=args.radial_weighting, lr_schedule=args.lr_schedule,
                       lr_final=args.lr_final, refine_poses=args.refine_poses,
                       pose_lr=args.pose_lr, pose_start=args.pose_start,
                       size_correction=args.size_correction,
                       average_tilt=tilt[0], learn_tilt=tilt[1])


def main(args):
    import torch

    from spiscape.io import read_detector
    from spiscape.vae import analysis, data, train
    from spiscape.vae.model import ewald_grid

    cfg = config_from_args(args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    det = read_detector(args.detector)
    inputs = data.read_inputs(args.averages, args.orientation, args.embedding, args.clusters,
                              args.min_cluster_fraction, args.max_detour)
    if cfg.size_correction == "commonlines":
        if not args.commonlines:
            raise ConfigError("--size-correction commonlines needs --commonlines "
                              "(commonlines.h5)")
        if inputs.labels is None:
            raise ConfigError("--size-correction commonlines needs --embedding (its clusters "
                              "are the populations whose size spread is corrected)")
        scales = read_pair_scales(args.commonlines, inputs.replicate, inputs.klass)
        inputs.log_scale = data.size_offsets(scales, inputs.labels, inputs.selected,
                                             inputs.frames)
        d = inputs.log_scale[inputs.selected]
        log.info("size correction: the averages trained on are %.3f..%.3f (5th..95th "
                 "percentile) times their cluster's mean size%s", *np.exp(np.percentile(
                     d, [5, 95])), "" if np.any(d != 0) else " (no size search in the "
                 "common lines: nothing to correct)")
    size = inputs.intens.shape[-1]
    q = ewald_grid(size, det.detd, det.ewald_rad)
    qnorm = np.linalg.norm(q, axis=0)
    if args.q_step == "auto":  # the grid spans the averages' measured pixels
        cfg.q_step = max(1.0, float(qnorm[inputs.support].max()) / (cfg.volume_size // 2 - 1))
    else:
        cfg.q_step = float(args.q_step)
    if cfg.q_step != 1.0:
        log.info("q step: %.3f detector pixels per voxel (the %d^3 grid spans |q| <= %.1f px)",
                 cfg.q_step, cfg.volume_size, cfg.q_step * (cfg.volume_size // 2 - 1))
        q, qnorm = q / cfg.q_step, qnorm / cfg.q_step
    sel = inputs.selected
    profile = data.radial_profile(inputs.intens[sel], inputs.support, qnorm, inputs.gain[sel],
                                  nbins=cfg.volume_size + 2)
    if args.q_min == "auto":
        cfg.q_min = data.beamstop_radius(det)
        log.info("q_min auto: the beamstop's edge in the detector mask, %.2f pixels", cfg.q_min)
    weight = data.loss_weight(inputs.support, qnorm, cfg.volume_size, cfg.q_min / cfg.q_step)
    if weight.sum() < 10:
        raise InputError(args.averages, "fewer than 10 measured pixels inside the volume")
    q_per_voxel = args.q_per_pixel
    truth = None
    if args.truth:
        from spiscape.io.truth import read_truth

        truth = read_truth(args.truth)
        q_per_voxel = q_per_voxel or truth.attrs.get("q_per_voxel_inv_nm")
    if q_per_voxel:
        q_per_voxel = float(q_per_voxel) * cfg.q_step
    out = Path(args.out_dir)
    merge = None
    if args.emc_merge and cfg.q_step != 1.0:
        raise ConfigError("--emc-merge needs --q-step 1 (the EMC merged on the detector's "
                          "pixel grid)")
    if args.frame_latent == "posterior" and not (args.photons and args.replicates):
        raise ConfigError("--frame-latent posterior needs --photons and --replicates")
    if args.volumes_from == "frames" and not (
            args.photons and args.replicates and args.frame_latent != "classes"
            and args.frame_poses == "global" and args.frame_refine >= 1):
        raise ConfigError("--volumes-from frames needs the volumes refined from the frames: "
                          "--photons, --replicates, --frame-poses global, --frame-refine >= 1")
    if args.emc_merge and not args.replicates:
        raise ConfigError("--emc-merge needs --replicates (the EMC's angles and pixels)")
    if args.emc_merge:
        from spiscape.vae.merge import merge_operator, read_emc_geometry

        geo = read_emc_geometry(args.replicates)
        merge = merge_operator(det, geo, size)
        log.info("averages predicted as the EMC merged them: %d in-plane angles x %d pixels on "
                 "a %d px grid%s", geo.angles.size, geo.model_pixels.size, geo.size,
                 ", Friedel-symmetrised" if geo.friedel else "")
    ctx = train.setup_distributed(cfg.device)
    tens = data.tensors(inputs, q, profile, weighting=cfg.frame_weighting)
    (log.info if ctx.main else log.debug)(
        "training on %d of %d averages (%d x %d, %d pixels in the loss), V = %d, zdim %d, %s, "
        "device %s, world %d", int(sel.sum()), sel.size, size, size, int(weight.sum()),
        cfg.volume_size, cfg.zdim, cfg.point_group, ctx.device, ctx.world)
    dropped = 0
    try:
        pix = data.pixel_weights(weight, qnorm, profile, cfg.radial_weighting)
        first = out / "first_pass" if args.drop_misfits else out
        first.mkdir(parents=True, exist_ok=True)
        model, result = train.train(cfg, tens, weight, q, profile, first, resume=args.resume,
                                    ctx=ctx, pixel_weight=pix, merge=merge)
        if args.drop_misfits:
            drop = misfit_averages(model, result, inputs, tens, weight, cfg, ctx,
                                   args.drop_misfits)
            dropped = int(drop.sum())
            if dropped:
                inputs.selected = inputs.selected & ~drop
                if cfg.size_correction == "commonlines":
                    inputs.log_scale = data.size_offsets(scales, inputs.labels, inputs.selected,
                                                         inputs.frames)
                tens = data.tensors(inputs, q, profile, weighting=cfg.frame_weighting)
                model, result = train.train(cfg, tens, weight, q, profile, out,
                                            resume=args.resume, ctx=ctx, pixel_weight=pix,
                                            merge=merge)
    finally:
        if ctx.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if not ctx.main:
        return 0
    model.eval()
    scores = {} if not args.drop_misfits else {"misfits_dropped": dropped}
    if model.tilt is not None:
        scores["average_tilt_deg"] = model.tilt_deg()
        log.info("averages predicted over a ring of tilts by %.2f deg out of their plane%s",
                 model.tilt_deg(), " (fitted)" if cfg.learn_tilt else "")
    sel = inputs.selected
    train.save_model(out / "model.pt", model, profile, q, {"train_config": vars(cfg)})
    every = data.tensors(inputs, q, profile, index=np.arange(sel.size))
    wt = torch.as_tensor(weight, dtype=torch.float32)
    mu, logvar = train.encode(model, every, wt, ctx.device)
    poses = None
    if "pose_delta" in result:
        poses = scoring.refined_poses(inputs.quaternion, sel, result.pop("pose_delta"),
                                      cfg.point_group)
        change = poses["pose_change_deg"][sel]
        log.info("pose refinement: the %d averages trained on turned by %.2f deg (median), "
                 "%.2f deg (90th percentile), %.2f deg (max)", change.size, np.median(change),
                 np.percentile(change, 90), change.max())
        scores["pose_change_deg_median"] = float(np.median(change))
    volumes_io.write_latent(out / "latent.h5", mu, logvar, sel, poses)
    # the volumes along the latent: the decoder's, or (--volumes-from frames) those refined
    # from the frames themselves by the per-frame posterior (--frame-refine)
    volume_at = partial(analysis.decode_volumes, model, device=ctx.device)
    refined = False
    frame_size = (None, None, None)
    if args.replicates:
        from spiscape.io.replicate import read_replicates

        reps = read_replicates(args.replicates)
        num_frames = args.num_frames or (truth.num_frames if truth is not None else None) or (
            max(int(r.frames.max()) for r in reps if r.frames.size) + 1)
        # only the averages trained on: frames of excluded clusters (contaminants) stay NaN, and
        # mixed frames are renormalised over the kept classes
        latent = analysis.frame_latents(args.replicates, inputs.replicate[sel],
                                        inputs.klass[sel], mu[sel], num_frames)
        attrs = {"averages": str(args.averages), "zdim": cfg.zdim, "method": "classes"}
        extra = {}
        if args.photons and args.frame_latent != "classes":
            post = posterior_frame_latents(args, model, det, inputs, mu, poses, num_frames,
                                           cfg, ctx.device)
            extra = {"latent_sd": post["sd"], "latent_classes": latent}
            latent = post["latent"]
            attrs.update(method="posterior", points=args.frame_latent_points,
                         size_range=args.frame_size_range, size_steps=args.frame_size_steps,
                         poses=args.frame_poses)
            scores["frame_evidence"] = post["evidence"]
            if args.frame_poses == "global":
                attrs.update(pose_step_deg=args.frame_pose_step, refine=args.frame_refine)
                extra.update(size=post["size"][:, None], size_sd=post["size_sd"][:, None])
                frame_size = (latent, post["size"], post["size_factors"])
                scores["frame_evidence_steps"] = post["evidence_steps"]
                if args.volumes_from == "frames":
                    from spiscape.vae.frame_posterior import volumes_along

                    volume_at = partial(volumes_along, post["grid"], post["volumes"])
                    refined = True
            else:
                attrs["tilt_deg"] = post["tilt_deg"]
                scores["frame_tilt_deg"] = post["tilt_deg"]
                if post["tilt_evidence"]:
                    scores["frame_tilt_evidence"] = post["tilt_evidence"]
        volumes_io.write_frame_latent(out / "frame_latent.h5", latent, attrs, extra)
        scores["frames_assigned"] = int(np.isfinite(latent[:, 0]).sum())
    z, has_data = analysis.latent_points(mu[sel], args.num_volumes)
    vols = volume_at(z)
    source = (f"the decoder's refined from the frames ({args.frame_refine} EM iteration(s))"
              if refined else "the decoder's")
    log.info("volumes along the latent: %d, %s", len(vols), source)
    volumes_io.write_volumes(out / "volumes.h5", z, vols, has_data, q_per_voxel, cfg.point_group,
                           {"q_min_measured": float(qnorm[weight].min()),
                            "q_max_measured": float(qnorm[weight].max()),
                            "q_step_pixels": cfg.q_step, "source": source})
    write_maps(out / "volumes", vols, z, kind="intensity", voxel=q_per_voxel,
               source=str(args.averages))
    figure_dir = Path(args.figure_dir or out)
    if not args.no_figures:
        figure_dir.mkdir(parents=True, exist_ok=True)
    colour = None
    if truth is not None:
        scores.update(scoring.score_against_truth(args.averages, args.replicates, inputs, truth,
                                                  mu, model, weight, qnorm, ctx, figure_dir,
                                                  figures=not args.no_figures,
                                                  step=cfg.q_step,
                                                  volume_at=volume_at if refined else None))
        colour = scores.pop("_average_t", None)
    with atomic_path(out / "training.json") as tmp:
        tmp.write_text(json.dumps({"config": vars(cfg), **result, "scores": scores},
                                  indent=1, default=_jsonable))
    if not args.no_figures:
        from spiscape.vae import figures

        figures.all_figures(figure_dir, intens=vols, z=z, has_data=has_data, mu=mu, selected=sel,
                            colour=colour, history=result["history"],
                            convergence=result["convergence"], frame_latent=frame_size[0],
                            frame_size=frame_size[1], frame_size_steps=frame_size[2])
    log.info("wrote %s (model.pt, latent.h5, volumes.h5, %d MRC)%s", out, len(vols),
             "; scores " + json.dumps(scores) if scores else "")
    return 0


def slicing_poses(inputs, poses) -> tuple[np.ndarray, np.ndarray]:
    """The orientations (A, 4) and log sizes (A,) the decoder slices each average at: the
    refined quaternions when ``poses`` (:func:`scoring.refined_poses`) has them, the size
    offsets (0 without size correction)."""
    quaternion = inputs.quaternion if poses is None else poses["quaternion_refined"]
    log_scale = np.zeros(inputs.selected.size) if inputs.log_scale is None else inputs.log_scale
    return quaternion, log_scale


def misfit_averages(model, result, inputs, tens, weight, cfg, ctx, z_max) -> np.ndarray:
    """(A,) bool: the averages trained on whose misfit under the first training's decoder is
    an outlier (:mod:`spiscape.vae.misfit`); every rank computes the same."""
    import torch

    from spiscape.vae import misfit as misfit_mod
    from spiscape.vae import train

    sel = np.flatnonzero(inputs.selected)
    wt = torch.as_tensor(weight, dtype=torch.float32)
    model.eval()
    mu = np.zeros((inputs.selected.size, cfg.zdim))
    mu[sel] = train.encode(model, tens, wt, ctx.device)[0]
    poses = None
    if "pose_delta" in result:
        poses = scoring.refined_poses(inputs.quaternion, inputs.selected, result["pose_delta"],
                                      cfg.point_group)
    quaternion, log_scale = slicing_poses(inputs, poses)
    values = misfit_mod.average_misfit(model, inputs.intens, weight.ravel(), mu, quaternion,
                                       log_scale, sel)
    z = misfit_mod.misfit_z(values)
    out = z > z_max
    drop = np.zeros(inputs.selected.size, dtype=bool)
    drop[sel[out]] = True
    (log.info if ctx.main else log.debug)(
        "misfit under the decoder: %d of %d averages trained on lie above z %.1f (%s)%s",
        int(out.sum()), sel.size, z_max,
        ", ".join(f"{z_:.1f}" for z_ in np.sort(z[out])[::-1]) or "none",
        ": trained again without them" if out.any() else "")
    return drop


def posterior_frame_latents(args, model, det, inputs, mu, poses, num_frames, cfg, device):
    """Each frame's posterior latent (:mod:`spiscape.vae.frame_posterior`) of the frames with a
    trained class: its orientation searched over all orientations (--frame-poses global) or at
    its classes' refined orientations and size offsets (:func:`classes_frame_latents`)."""
    import time

    from spiscape.backend import get_array_module
    from spiscape.vae import frame_posterior

    sel = inputs.selected
    quaternion, log_scale = slicing_poses(inputs, poses)
    classes = frame_posterior.Classes(replicate=inputs.replicate[sel], klass=inputs.klass[sel],
                                      quaternion=quaternion[sel], log_scale=log_scale[sel])
    z = frame_posterior.latent_grid(mu[sel], args.frame_latent_points)
    sizes = frame_posterior.size_steps(args.frame_size_range, args.frame_size_steps)
    # CuPy where the VAE ran on a GPU and CuPy is there (the gpu extra); NumPy otherwise
    xp = get_array_module("auto" if str(device).startswith("cuda") else "cpu")
    start = time.perf_counter()
    if args.frame_poses == "global":
        scored = frame_posterior.scored_frames(args.replicates, classes, num_frames)
        post = frame_posterior.global_latents(
            model, det, args.photons, z, scored, q_min=cfg.q_min, q_step=cfg.q_step,
            sizes=sizes, step_deg=args.frame_pose_step, refine=args.frame_refine, xp=xp,
            device=device)
        post["grid"], post["size_factors"] = z, np.exp(sizes)
        how = (f"over a {args.frame_pose_step:g} degree orientation grid, the volumes refined "
               f"from the frames {args.frame_refine} time(s)")
    else:
        post = classes_frame_latents(args, model, det, classes, z, sizes, num_frames, cfg, xp,
                                     device)
        how = f"at its classes' orientations, tilts {post['tilt_deg']:g} degrees"
    sd = post["sd"][:, 0]
    log.info("per-frame latents: the posterior of %d frames under the decoder %s (median sd "
             "%.3f of a latent span %.3f; mean log evidence %.2f; %.0f s)",
             int(np.isfinite(sd).sum()), how,
             float(np.nanmedian(sd)) if np.isfinite(sd).any() else float("nan"),
             float(np.ptp(mu[sel][:, 0])), post["evidence"], time.perf_counter() - start)
    return post


def classes_frame_latents(args, model, det, classes, z, sizes, num_frames, cfg, xp, device):
    """--frame-poses classes: each frame scored at its candidate classes' orientations, over
    tilts of --frame-tilt degrees (auto: chosen on the frames of a sample of the classes)."""
    from spiscape.vae import frame_posterior

    def run(which, angle: float, subset=None) -> dict:
        return frame_posterior.posterior_latents(
            model, det, args.replicates, args.photons, which, z, num_frames, q_min=cfg.q_min,
            q_step=cfg.q_step, sizes=sizes, tilts=frame_posterior.tilt_rotations(angle),
            subset=subset, xp=xp, device=device)

    evidence = {}
    tilt = args.frame_tilt
    if tilt == "auto":
        sample, frames = frame_posterior.tilt_sample(classes, args.replicates, num_frames)
        if not frames.any():
            log.info("per-frame tilt: no frame has a trained class to choose it on; 0 degrees")
            tilt = 0.0
        else:
            tilt, evidence = frame_posterior.choose_tilt(
                lambda a: run(sample, a, frames)["evidence"])
            log.info("per-frame tilt: mean log evidence per frame %s; %g degrees chosen",
                     ", ".join(f"{a:g} deg {v - evidence[0.0]:+.2f}" if 0.0 in evidence
                               else f"{a:g} deg {v:.2f}" for a, v in evidence.items()), tilt)
    post = run(classes, float(tilt))
    post.update(tilt_deg=float(tilt), tilt_evidence=evidence)
    return post


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
