"""Simulate an SPI dataset of heterogeneous gold nanoparticles (cubes melting into spheres).

Frames are Poisson samples of randomly oriented particles' diffraction on a flat detector, with
fluence jitter, modelled on the reference experiment (42 nm gold cubes, 6 keV, 705 mm, 200 um
pixels, 1.8 degree scattering angle). Populations: cubes, a continuous cube->sphere melting
series, spheres, and two contaminants (dimers of touching spheres, rods). Writes photons.h5 and
detector.h5 (Dragonfly formats), truth.h5 (per-frame population, shape parameter t, orientation,
fluence, size, and the noiseless 3D intensities) and simulate.json (summary, written last).
"""

from __future__ import annotations

import argparse
import logging

from spiscape.errors import ConfigError
from spiscape.simulate.run import POPULATIONS, SimulationParams, simulate_dataset
from spiscape.utils.args import at_least

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out_dir": "folder"}

#: shown under "Example" in ``spiscape simulate -h``
EXAMPLE = """\
spiscape simulate --out-dir data/ --num-frames 4000 --mean-photons 1500 --seed 1
"""

_DEFAULTS = SimulationParams()

# field name -> help; every SimulationParams field has a flag named after it (_ -> -)
HELP = {
    "num_frames": "number of diffraction patterns (frames) to simulate",
    "seed": "random seed; the same seed gives the same frames, orientations and labels",
    "mean_photons": "average number of photons per frame (signal plus background)",
    "fluence_shape": "shape k of the Gamma distribution (mean 1) of the incident fluence per "
    "frame; larger is steadier (relative spread 1/sqrt(k)); 0 = every frame the same fluence",
    "background_photons": "average background photons per frame, spread over the detector in "
    "proportion to solid angle x polarisation (part of --mean-photons)",
    "distance_mm": "sample-detector distance in mm",
    "pixel_um": "physical detector pixel size in micrometres (before binning)",
    "energy_kev": "photon energy in keV (6 keV = 0.2066 nm)",
    "max_angle_deg": "largest scattering angle (2 theta, degrees) kept; the square detector "
    "covers this circle and its corners are 'merged only' (mask 1)",
    "binning": "pixels binned together along each axis (4 turns 200 um into 800 um pixels)",
    "beamstop_px": "radius of the beamstop (bad pixels, mask 2) in binned pixels",
    "gap_px": "height of the horizontal panel gap (bad pixel rows) in binned pixels; it lies "
    "just above the beamstop, off-centre like a real panel gap",
    "grid_size": "side N of the N^3 grid of the 3D intensities (one voxel = one pixel at the "
    "detector centre); must reach the detector's highest q",
    "cube_edge_nm": "edge length of the gold cubes in nm",
    "cube_edge_spread": "relative standard deviation of the cube edge (also of the melting "
    "particles), e.g. 0.03 for 3 %%",
    "sphere_diameter_spread": "relative standard deviation of the sphere diameter",
    "melting_levels": "number of shapes cached along the cube->sphere melting series (t = 0..1)",
    "p_max": "superball exponent of the t = 0 end of the melting series (p = 2 is a sphere)",
    "volume_growth": "relative volume growth from cube (t = 0) to sphere (t = 1); 0.10 = 10 %%",
    "fractions": "population fractions summing to 1, as name=fraction; populations: "
    + ", ".join(POPULATIONS) + " (missing ones are 0)",
    "dimer_sphere_diameter_nm": "diameter of each of the two touching spheres of a dimer, in nm",
    "rod_length_nm": "length of the rod-shaped contaminant in nm",
    "rod_diameter_nm": "diameter of the rod-shaped contaminant in nm",
    "chunk_frames": "frames simulated at a time (bounds the memory in use)",
}


def _fraction_pair(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected name=fraction, got {text!r}")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"fraction of {name!r} is not a number: {value!r}"
        ) from None


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out-dir", required=True,
        help="folder that receives photons.h5, detector.h5, truth.h5 and simulate.json",
    )
    group = parser.add_argument_group("simulation parameters")
    for name, value in _DEFAULTS.to_dict().items():
        flag = "--" + name.replace("_", "-")
        if name == "fractions":
            default = [f"{k}={v:g}" for k, v in value.items()]
            group.add_argument(flag, nargs="+", type=_fraction_pair,
                               default=argparse.SUPPRESS,
                               metavar="NAME=FRACTION",
                               help=f"{HELP[name]} (default: {' '.join(default)})")
            continue
        if isinstance(value, int):  # counts and sizes >= 1; the seed and pixel radii >= 0
            kind = at_least(0 if name in ("seed", "beamstop_px", "gap_px") else 1)
        else:
            kind = float
        group.add_argument(flag, type=kind, default=value, help=HELP[name])


def params_from_args(args: argparse.Namespace) -> SimulationParams:
    options = {}
    for name in _DEFAULTS.to_dict():
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "fractions":
            pairs = dict(value)
            if len(pairs) != len(value):
                raise ConfigError("a population appears twice in --fractions")
            value = pairs
        options[name] = value
    return SimulationParams.from_dict(options)


def main(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    summary = simulate_dataset(params, args.out_dir)
    log.info("populations: %s", summary["populations"])
    return 0
