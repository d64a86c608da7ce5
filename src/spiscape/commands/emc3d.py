"""Multi-model 3D EMC: K 3D intensity models and each frame's model, orientation and scale.

Each frame is explained by one of K models at one of the orientations of the refined 600-cell
(Dragonfly's num_div: 10 (5n³ + n) rotations), with a per-frame scale, Friedel symmetry,
optionally a point group (its asymmetric unit sampled and the models symmetrised, after a warm-up
without it that lets the data choose the axes) and annealed beta. Frames are sharded over MPI
ranks (mpiexec / srun); CuPy on a GPU. A checkpoint is written after every iteration; --resume
continues a killed run. Writes emc3d.h5, and optionally MRC maps and figures.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from spiscape.orient import rotations
from spiscape.utils.args import (
    add_run_control,
    at_least,
    auto_or_number,
    number_in,
    q_per_voxel_of,
)

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out": "file", "maps": "folder", "figure": "file", "convergence": "file",
           "volumes": "file"}

#: shown under "Example" in ``spiscape emc3d -h``
EXAMPLE = """\
spiscape emc3d --photons data/photons.h5 --detector data/detector.h5 --out emc3d/emc3d.h5 \\
    --num-models 2 --num-div 4 --iterations 30 --maps emc3d/maps --figure emc3d/models.png
spiscape emc3d ... --num-models 1 --point-group m-3m --num-div 10   # cubes, asymmetric unit
mpiexec -n 4 spiscape emc3d ...                                      # MPI ranks
"""


def add_args(parser):
    from spiscape.emc3d.run import MERGES, EMC3DParams

    d = EMC3DParams()
    parser.add_argument("--photons", nargs="+", required=True,
                        help="photon files (or a list file)")
    parser.add_argument("--detector", required=True, help="Dragonfly detector file (.h5 or .dat)")
    parser.add_argument("--out", required=True, help="output emc3d.h5")
    parser.add_argument("--num-models", type=at_least(1), default=None,
                        help=f"K: 3D models the frames are shared between (default "
                             f"{d.num_models}, or the number of groups of --init-labels)")
    parser.add_argument("--init-labels", default=None,
                        help="frames.h5 of the 2D route's landscape (same photon files): its "
                             "clusters seed the models (frames held to their cluster's model "
                             "for --label-iterations, then free; frames outside any cluster are "
                             "free from the start)")
    parser.add_argument("--from-model", nargs=2, metavar=("EMC3D_H5", "K"), default=None,
                        help="only the frames an earlier emc3d run gave to its model K (same "
                             "photon files): refine one population alone, e.g. the cube model "
                             "with --point-group m-3m and a finer --num-div")
    parser.add_argument("--start-models", default=None, metavar="H5",
                        help="start from these models instead of the powder: the intens "
                             "(K, V, V, V) of an emc3d.h5, of Dragonfly's output or start model "
                             "file, on this detector's grid (K defaults to theirs)")
    parser.add_argument("--init-by", choices=["clusters", "coordinates"], default="clusters",
                        help="with --init-labels: the landscape's clusters, or its frames' "
                             "coordinates grouped into --num-models groups by k-means")
    parser.add_argument("--label-iterations", type=at_least(1), default=d.label_iterations,
                        help="with --init-labels: iterations that hold the frames to them")
    parser.add_argument("--num-div", type=at_least(1), default=d.num_div,
                        help="orientation refinement: 10 (5n³ + n) rotations, about 54°/n "
                             "apart (4: 3,240)")
    parser.add_argument("--iterations", type=at_least(1), default=d.iterations,
                        help="EM iterations (β reaches 1 after 15-21 with the default schedule)")
    parser.add_argument("--point-group", default=d.point_group, choices=rotations.POINT_GROUPS,
                        help="symmetry of the models (m-3m / 432: cubes; 1: none)")
    parser.add_argument("--warmup", type=at_least(0), default=d.warmup,
                        help="with a point group: iterations without it (at half the num_div) "
                             "before the models are turned onto the group's axes and "
                             "symmetrised")
    parser.add_argument("--beta-start", type=auto_or_number(0.0, words=("mean", "auto")),
                        default=d.beta_start,
                        help="initial inverse temperature: 'mean' = 1/sqrt(mean photons per "
                             "frame) for every frame, 'auto' = 1/sqrt(photons) per frame, or a "
                             "number")
    parser.add_argument("--beta-jump", type=number_in(1), default=d.beta_jump,
                        help="β is multiplied by this every --beta-period iterations (to 1)")
    parser.add_argument("--beta-period", type=at_least(1), default=d.beta_period,
                        help="iterations between β jumps")
    parser.add_argument("--merge", default=d.merge, choices=MERGES,
                        help="M-step: 'tomograms' (EMC's compress step, as Dragonfly: each "
                             "orientation's estimate Σ P K / Σ P φ merged with equal weight) or "
                             "'photons' (every photon merged alike; noisier models where "
                             "frames sit on few orientations)")
    parser.add_argument("--need-scaling", action=argparse.BooleanOptionalAction,
                        default=d.need_scaling,
                        help="fit a scale (fluence) per frame (default on)")
    parser.add_argument("--seed", type=at_least(0), default=d.seed,
                        help="seed of the initial models' noise (and of --init-by coordinates)")
    parser.add_argument("--init-noise", type=number_in(0, 1, high_open=True),
                        default=d.init_noise,
                        help="relative noise on the initial models (the powder, isotropic)")
    parser.add_argument("--held-out", type=number_in(0, 0.5, high_open=True),
                        default=d.held_out,
                        help="share of the frames left out of the fit and scored at the end "
                             "(held-out log-likelihood per frame in emc3d.h5 and the log), to "
                             "compare runs with different --num-models and the same --seed. "
                             "Not a K selector on its own: at coarse num_div extra models "
                             "also buy finer orientations, so it keeps rising with K even on "
                             "one population (docs/methods.md)")
    parser.add_argument("--refine-cubic", action=argparse.BooleanOptionalAction, default=False,
                        help="then refine each model that m-3m explains (at least half of its "
                             "anisotropic log-intensity power kept by symmetrising) on its "
                             "frames alone with m-3m at --refine-num-div, and keep the refined "
                             "model in its place (its frames' orientations in EMC3D_H5's "
                             "sibling .modelK.h5); the workflow's default")
    parser.add_argument("--refine-num-div", type=at_least(1), default=8,
                        help="num_div of the cubic refinement (m-3m's asymmetric unit: 8 is "
                             "1,087 orientations, about 7° apart)")
    parser.add_argument("--refine-iterations", type=at_least(2), default=30,
                        help="iterations of the cubic refinement (the first 10 without the "
                             "group, as --warmup)")
    parser.add_argument("--block-frames", type=at_least(1), default=None,
                        help="frames per E-step block (default: from --memory-mb)")
    add_run_control(parser, "where the products run (gpu: CuPy)",
                    cpu_default="4096, or a quarter of the machine's memory if less")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--q-per-pixel", type=number_in(0, low_open=True), default=None,
                       help="1/nm per detector pixel at the centre: the models' q scale (for "
                            "the maps, spiscape orient --reference-file and phasing)")
    scale.add_argument("--truth", default=None,
                       help="the simulator's truth.h5: its q scale (same as --q-per-pixel)")
    parser.add_argument("--volumes", default=None,
                        help="also write the models as a volumes file for spiscape phase "
                             "(z = model number)")
    parser.add_argument("--maps", default=None,
                        help="folder for the models' intensities as MRC maps (intensity_K.mrc)")
    parser.add_argument("--figure", default=None, help="PNG: the models' central sections")
    parser.add_argument("--convergence", default=None, help="PNG: convergence and occupancy")


def refine_cubic(emc, first: Path, out: Path, args, params, q_per_voxel) -> None:
    """Each model of the run ``first`` that m-3m explains (:func:`spiscape.emc3d.slicing.
    anisotropic_share` at least :data:`spiscape.emc3d.run.CUBIC_SHARE`, over the measured shells
    to 0.7 of the largest) refined on its frames alone with m-3m at ``--refine-num-div``
    (``.modelK.h5`` beside ``out``); ``out`` is ``first`` with those models replaced, the shares
    as ``anisotropic_share_m3m (K,)`` and the refined models' numbers as the attribute
    ``refined_m3m`` (JSON). All ranks take part; rank 0 reads and writes."""
    import json
    import shutil

    import h5py
    import numpy as np

    from spiscape.emc3d.run import CUBIC_SHARE, EMC3D, EMC3DParams
    from spiscape.emc3d.slicing import anisotropic_share
    from spiscape.io.emc3d import read_emc3d
    from spiscape.utils.atomic import atomic_path

    info = None
    if emc.rank == 0:
        result = read_emc3d(first)
        radius = np.sqrt((emc.q ** 2).sum(axis=0))
        band = (float(radius.min()), 0.7 * float(radius.max()))
        shares = [anisotropic_share(m, "m-3m", band) for m in result.intens]
        chosen = [k for k, share in enumerate(shares) if share >= CUBIC_SHARE]
        log.info("m-3m keeps %s of the models' anisotropy: refining %s",
                 [round(x, 3) for x in shares], chosen or "none")
        info = {"models": result.frames["model"], "shares": shares, "chosen": chosen}
    if emc.nranks > 1:
        info = emc.comm.bcast(info, root=0)
    refined = {}
    for k in info["chosen"]:
        sub = EMC3D(args.photons, args.detector, EMC3DParams(
            num_models=1, num_div=args.refine_num_div, iterations=args.refine_iterations,
            point_group="m-3m", warmup=min(args.warmup, args.refine_iterations - 1),
            beta_start=params.beta_start, beta_jump=params.beta_jump,
            beta_period=params.beta_period, need_scaling=params.need_scaling, seed=params.seed,
            memory_mb=params.memory_mb, device=params.device, merge=params.merge),
            select=info["models"] == k, comm=emc.comm)
        path = out.with_name(f"{out.stem}.model{k}{out.suffix}")
        sub.run(path, q_per_voxel=q_per_voxel)
        refined[k] = path
    if emc.rank != 0:
        return
    with atomic_path(out) as tmp:
        shutil.copyfile(first, tmp)
        with h5py.File(tmp, "a") as f:
            intens = f["intens"][()]
            for k, path in refined.items():
                intens[k] = read_emc3d(path).intens[0]
            f["intens"][...] = intens
            f["anisotropic_share_m3m"] = np.asarray(info["shares"], dtype=np.float64)
            f.attrs["refined_m3m"] = json.dumps({str(k): path.name for k, path in refined.items()})
    first.unlink()


def main(args):
    from spiscape.emc3d.run import EMC3D, EMC3DParams, landscape_groups

    labels = None
    num_models = args.num_models
    if args.init_labels:
        import numpy as np

        from spiscape.io.frames import read_landscape

        landscape = read_landscape(args.init_labels)
        labels = np.asarray(landscape["label"])
        if args.init_by == "coordinates":
            num_models = num_models or EMC3DParams().num_models
            labels = landscape_groups(landscape["clpca"], num_models, args.seed)
        elif num_models is None:
            num_models = int(np.unique(labels[labels >= 0]).size)
    if args.start_models and num_models is None:
        from spiscape.io.emc3d import read_start_models

        num_models = len(read_start_models(args.start_models))
    params = EMC3DParams(
        num_models=num_models or EMC3DParams().num_models,
        label_iterations=args.label_iterations, num_div=args.num_div, iterations=args.iterations,
        point_group=args.point_group, warmup=args.warmup if args.point_group not in ("1", "-1")
        else 0, beta_start=args.beta_start, beta_jump=args.beta_jump,
        beta_period=args.beta_period, need_scaling=args.need_scaling, seed=args.seed,
        init_noise=args.init_noise, block_frames=args.block_frames, memory_mb=args.memory_mb,
        device=args.device, held_out=args.held_out, merge=args.merge)
    select = None
    if args.from_model:
        from spiscape.errors import InputError
        from spiscape.io.emc3d import read_emc3d

        earlier, model = args.from_model
        if not model.isdigit():
            raise InputError(earlier, f"--from-model: the model number must be an integer, "
                                      f"got {model!r}")
        select = read_emc3d(earlier, volumes=False).frames["model"] == int(model)
        log.info("%d frames of model %s of %s", int(select.sum()), model, earlier)
    emc = EMC3D(args.photons, args.detector, params, labels=labels, select=select,
                start=args.start_models)
    q_per_voxel = q_per_voxel_of(args.truth, args.q_per_pixel, args.detector)
    out = Path(args.out)
    refine = args.refine_cubic and params.point_group in ("1", "-1")
    # with a refinement the run is written beside the output, which appears only when complete
    first = out.with_name(out.stem + ".unrefined" + out.suffix) if refine else out
    emc.run(first, checkpoint=Path(args.checkpoint) if args.checkpoint else None,
            resume=args.resume, q_per_voxel=q_per_voxel)
    if refine:
        refine_cubic(emc, first, out, args, params, q_per_voxel)
    if emc.rank != 0:
        return 0
    from spiscape.io.emc3d import read_emc3d

    result = read_emc3d(args.out)
    if args.maps:
        from spiscape.io.maps import write_maps

        write_maps(args.maps, result.intens, list(range(len(result.intens))),
                   kind="intensity", voxel=q_per_voxel, source=f"spiscape emc3d {args.out}")
    if args.volumes:
        import numpy as np

        from spiscape.io.volumes import write_volumes

        count = len(result.intens)
        write_volumes(args.volumes, np.arange(count, dtype=np.float64), result.intens,
                      np.ones(count, dtype=bool), q_per_voxel=q_per_voxel,
                      point_group=params.point_group,
                      attrs={"source": f"spiscape emc3d {args.out}"})
    if args.figure:
        from spiscape.emc3d.figures import sections_figure

        sections_figure(result.intens, result.occupancy, args.figure)
    if args.convergence:
        from spiscape.emc3d.figures import convergence_figure

        convergence_figure(result.log, args.convergence)
    log.info("wrote %s: occupancy %s", args.out, [round(float(x), 3) for x in result.occupancy])
    return 0
