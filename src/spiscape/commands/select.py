"""Select frames from the landscape (a cluster or a region) and write them as a photon list.

Picks the frames of one or more clusters (--cluster 2, or --cluster 0 3), or those inside a region
of the landscape given as comma-separated conditions that must all hold, each a component, a
comparison and a number: --region "pc1>0.1,pc2<0.3" (pcN: column N of clpca, counted from 1;
zN: column N of the VAE latent; operators < <= > >=). Frames never placed in the landscape are
never selected. The chosen frames are read from the dataset's photon files and written as one
new photon file, so the subset can be reprocessed (classify2d, embed ...) like any dataset.

Writes into --out (a folder): photons.h5 (Dragonfly HDF5 of just those frames, in increasing
frame order; .emc with --format emc), photons.lst (a list file naming it, accepted wherever
photon files are), and, last, indices.txt (the selected frame numbers of the original dataset,
one per line, with a header comment saying how they were chosen).
"""

from __future__ import annotations

import logging
from pathlib import Path

from spiscape.embed.selection import select_frames
from spiscape.errors import InputError
from spiscape.io.frames import read_landscape
from spiscape.utils.atomic import atomic_path

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out": "folder"}

#: shown under "Example" in ``spiscape select -h``
EXAMPLE = """\
spiscape select --landscape frames.h5 --photons data/photons.h5 --cluster 1 --out subset/
spiscape select --landscape frames.h5 --photons data/photons.h5 --region 'pc1>0.1' --out subset/
"""

def add_args(parser):
    parser.add_argument("--landscape", required=True, help="frames.h5 of `spiscape landscape`")
    parser.add_argument("--photons", nargs="+", required=True,
                        help="the dataset's photon files (or a list file), in the same order as "
                             "when it was classified")
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--cluster", type=int, nargs="+", default=None,
                        help="the cluster(s) to keep (label in frames.h5)")
    choice.add_argument("--region", default=None,
                        help='conditions that must all hold, e.g. "pc1>0.1,pc2<0.3"')
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", choices=["h5", "emc"], default="h5",
                        help="photon file format of the subset")


def main(args):
    from spiscape.io import count_frames, read_photons, write_photons

    landscape = read_landscape(args.landscape)
    total = landscape["clpca"].shape[0]
    available = count_frames(args.photons)
    if available != total:
        raise InputError(args.photons[0], f"{available} frames, but the landscape describes "
                                          f"{total}")
    indices = select_frames(landscape, args.cluster, args.region, args.landscape)
    log.info("selected %d of %d frames", indices.size, total)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photon_name = f"photons.{args.format}"
    write_photons(read_photons(args.photons, frames=indices), out / photon_name)
    with atomic_path(out / "photons.lst") as tmp:
        tmp.write_text(f"# frames selected from {args.landscape}\n{photon_name}\n")
    how = f"cluster {' '.join(map(str, args.cluster))}" if args.cluster is not None \
        else f"region {args.region}"
    header = (f"# {indices.size} frames of {total} selected by {how} from {args.landscape}\n"
              f"# photon files: {' '.join(map(str, args.photons))}\n")
    with atomic_path(out / "indices.txt") as tmp:
        tmp.write_text(header + "\n".join(map(str, indices.tolist())) + "\n")
    log.info("wrote %s (%d frames) and %s", out / photon_name, indices.size, out / "indices.txt")
