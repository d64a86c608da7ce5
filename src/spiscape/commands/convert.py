"""Convert photon files between Dragonfly HDF5, binary .emc and dense CXI frames.

Reads one or more inputs (Dragonfly sparse HDF5, binary .emc, dense CXI with
entry_1/data_1/data, or a .txt/.lst file listing such files one per line), concatenates their
frames in the order given and writes one sparse photon file: Dragonfly HDF5 for .h5/.hdf5, the
binary format for .emc. Frames are converted a chunk at a time, so inputs larger than memory are
fine, and the output appears only once it is complete. With --detector, the inputs must have
exactly the detector's number of pixels (dense CXI frames are flattened row by row).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from spiscape.errors import InputError
from spiscape.io import PhotonWriter, iter_chunks, photon_files, photon_header, read_detector
from spiscape.io.photon_writer import output_format

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"output": "file"}

#: shown under "Example" in ``spiscape convert -h``
EXAMPLE = """\
spiscape convert run.cxi -o run.emc --detector det.h5
spiscape convert a.emc b.emc -o all.h5
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="photon files: Dragonfly sparse HDF5 (.h5), binary .emc, dense CXI frames, or a "
        ".txt/.lst file listing them one per line; frames are joined in the order given",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="output photon file: .h5/.hdf5 for Dragonfly HDF5, .emc for the binary format",
    )
    parser.add_argument(
        "--detector",
        default=None,
        help="Dragonfly detector file (.h5 or .dat); when given, every input must have its "
        "number of pixels",
    )
    parser.add_argument(
        "--chunk-frames",
        type=_positive_int,
        default=50000,
        help="frames converted at a time; lower it if memory is short",
    )


def main(args: argparse.Namespace) -> int:
    output = Path(args.output)
    output_format(output)  # an unknown suffix fails before any reading
    num_pix = read_detector(args.detector).num_pix if args.detector else None
    files = photon_files(args.inputs)
    for path in files:
        if path.resolve() == output.resolve():
            raise InputError(output, "the output would overwrite one of the inputs")
    num_frames, num_pix = photon_header(files, num_pix=num_pix)
    if num_frames == 0:
        if len(files) == 1:
            raise InputError(files[0], "no frames: nothing to convert")
        raise InputError(None, f"no frames in {', '.join(map(str, files))}: nothing to convert")
    log.debug("converting %d frames of %d pixels from %d file(s)", num_frames, num_pix, len(files))

    started = time.perf_counter()
    photons = 0
    with PhotonWriter(output, num_pix) as writer:
        for start, chunk in iter_chunks(files, args.chunk_frames, num_pix=num_pix):
            writer.append(chunk)
            photons += int(chunk.photons_per_frame().sum())
            log.debug("frames %d-%d done", start, start + chunk.num_frames)
    log.info(
        "wrote %s: %d frames, %d photons, %d pixels (%.1f s)",
        output, num_frames, photons, num_pix, time.perf_counter() - started,
    )
    return 0
