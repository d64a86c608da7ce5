"""EMC 2D classification of sparse photon frames into class averages (one bootstrap replicate).

Expectation-maximisation with in-plane rotations, per-frame scale and deterministic annealing of
beta, as in Dragonfly's 2D mode. Frames are sharded over MPI ranks when launched with mpiexec or
srun (each rank reads only its own frames), and the E-step runs on a GPU through CuPy when one is
there. A checkpoint is written after every iteration; --resume continues a killed run.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from spiscape.emc import EMC2D, EMCParams
from spiscape.utils.args import add_run_control, at_least, auto_or_number

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out": "file"}

#: shown under "Example" in ``spiscape classify2d -h``
EXAMPLE = """\
spiscape classify2d --photons data/photons.h5 --detector data/detector.h5 \\
    --out emc/rep0.h5 --num-classes 50 --num-rot 36 --friedel --iterations 40
mpiexec -n 4 spiscape classify2d ... --replicate 1 --fraction 0.8   # MPI ranks
"""


def _beta_start(text: str):
    return text if text == "auto" else float(text)


def add_args(parser):
    parser.add_argument("--photons", nargs="+", required=True,
                        help="sparse photon files (Dragonfly .h5/.emc), a list file, or CXI")
    parser.add_argument("--detector", required=True, help="Dragonfly detector file (.h5 or .dat)")
    parser.add_argument("--out", required=True,
                        help="output HDF5 (results/{ds}/classify2d/rep{r}.h5)")
    d = EMCParams()
    parser.add_argument("--num-classes", type=at_least(1), default=d.num_classes,
                        help="number of 2D class models M")
    parser.add_argument("--num-rot", type=at_least(1), default=d.num_rot,
                        help="in-plane rotations, over 2 pi (or over pi with --friedel)")
    parser.add_argument("--iterations", type=at_least(1), default=d.iterations,
                        help="EM iterations")
    parser.add_argument("--size", type=int, default=None,
                        help="model grid size S (default: smallest odd size holding the detector)")
    parser.add_argument("--friedel", action=argparse.BooleanOptionalAction,
                        default=d.friedel,
                        help="impose Friedel (centro-)symmetry; rotations then span pi")
    parser.add_argument("--need-scaling", action=argparse.BooleanOptionalAction,
                        default=d.need_scaling,
                        help="fit a scale (incident fluence) per frame")
    parser.add_argument("--beta-start", type=_beta_start, default=d.beta_start,
                        help="initial inverse temperature, or 'auto' = 1/sqrt(photons per frame)")
    parser.add_argument("--beta-jump", type=float, default=d.beta_jump,
                        help="factor applied to beta every --beta-period iterations")
    parser.add_argument("--beta-period", type=at_least(1), default=d.beta_period,
                        help="iterations between beta jumps")
    parser.add_argument("--seed", type=at_least(0), default=d.seed,
                        help="seed of the initial models and of the replicate's frame selection")
    parser.add_argument("--replicate", type=at_least(0), default=d.replicate,
                        help="bootstrap replicate number (selects frames and initial models)")
    parser.add_argument("--fraction", type=float, default=d.fraction,
                        help="fraction of the frames drawn for this replicate (1 = all)")
    parser.add_argument("--init-noise", type=float, default=d.init_noise,
                        help="relative amplitude of the random pattern of the initial models")
    parser.add_argument("--sharpen-iterations", type=at_least(0), default=d.sharpen_iterations,
                        help="exact (ML) M-steps of the final probabilities that make the "
                             "averages written out; 0: the last merged model, as Dragonfly")
    parser.add_argument("--sharpen-oversample", type=at_least(1), default=d.sharpen_oversample,
                        help="those steps run on a grid this many times finer than the pixels")
    parser.add_argument("--sharpen-photons", type=float, default=d.sharpen_photons,
                        help="a grid point into which C photons were merged keeps C / (C + this) "
                             "of the sharpening (faint pixels stay as merged); 0: all of it")
    parser.add_argument("--reseed-share", type=float, default=d.reseed_share,
                        help="before each beta jump (not in the last two beta levels), a class "
                             "holding less than this share of its fair N/M frames is re-seeded "
                             "from the most populated class; 0: never (Dragonfly)")
    parser.add_argument("--block-frames", type=at_least(1), default=None,
                        help="frames per E-step block (default: sized to --memory-mb)")
    parser.add_argument("--threads", type=at_least(1), default=None,
                        help="worker threads of each rank (default: OMP_NUM_THREADS, else "
                             "every core this process may use)")
    parser.add_argument("--sparse-below", type=auto_or_number(0.0), default=d.sparse_below,
                        help="pixels whose photon density (share of frames with a photon there) "
                             "is below this go through CSR products, the rest dense; 'auto' "
                             "measures the crossover on this machine; 0: all dense, 1: all CSR")
    add_run_control(parser, "where the E-step runs (frames that do not fit --memory-mb are "
                            "streamed from the photon files)")


def main(args):
    params = EMCParams(
        num_classes=args.num_classes, num_rot=args.num_rot, iterations=args.iterations,
        size=args.size, friedel=args.friedel, need_scaling=args.need_scaling,
        beta_start=args.beta_start, beta_jump=args.beta_jump, beta_period=args.beta_period,
        seed=args.seed, replicate=args.replicate, fraction=args.fraction,
        init_noise=args.init_noise, sharpen_iterations=args.sharpen_iterations,
        sharpen_oversample=args.sharpen_oversample, sharpen_photons=args.sharpen_photons,
        reseed_share=args.reseed_share, block_frames=args.block_frames, device=args.device,
        threads=args.threads, memory_mb=args.memory_mb, sparse_below=args.sparse_below,
    )
    emc = EMC2D(args.photons, args.detector, params)
    out = Path(args.out)
    emc.run(out, checkpoint=Path(args.checkpoint) if args.checkpoint else None, resume=args.resume)
    if emc.rank == 0:
        log.info("wrote %s", out)
