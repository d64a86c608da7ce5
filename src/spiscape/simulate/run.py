"""The simulation driver: parameters, populations, and ``simulate_dataset(params, out_dir)``.

Writes to ``out_dir``: ``detector.h5`` (Dragonfly detector), ``truth.h5`` (see
:mod:`spiscape.io.truth`), ``photons.h5`` (Dragonfly sparse photons) and, last, the summary
``simulate.json`` whose presence means the run finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from spiscape.errors import ConfigError
from spiscape.io import Detector, PhotonWriter, SparsePhotons, write_detector
from spiscape.io.truth import write_truth
from spiscape.simulate import detector as geom
from spiscape.simulate import frames as fr
from spiscape.simulate import intensity as it
from spiscape.simulate import shapes as sh
from spiscape.utils.atomic import atomic_path

log = logging.getLogger(__name__)

#: population names; the label of a frame is the index in this tuple
POPULATIONS = ("cube", "melting", "sphere", "dimer", "rod")
LABELS = {name: i for i, name in enumerate(POPULATIONS)}
#: populations without a melting parameter (t = NaN)
CONTAMINANTS = ("dimer", "rod")
#: size factors are drawn from a normal distribution truncated at this many standard deviations
SIZE_TRUNCATION = 3.0


def _default_fractions() -> dict[str, float]:
    return {"cube": 0.3, "melting": 0.3, "sphere": 0.2, "dimer": 0.1, "rod": 0.1}


@dataclass
class SimulationParams:
    """Everything a simulated dataset depends on; lengths in nm unless the name says otherwise."""

    num_frames: int = 4000
    seed: int = 1
    mean_photons: float = 1500.0
    fluence_shape: float = 4.0
    background_photons: float = 0.0
    distance_mm: float = 705.0
    pixel_um: float = 200.0
    energy_kev: float = 6.0
    max_angle_deg: float = 1.8
    binning: int = 4
    beamstop_px: float = 3.0
    gap_px: int = 2
    grid_size: int = 64
    cube_edge_nm: float = 42.0
    cube_edge_spread: float = 0.03
    sphere_diameter_spread: float = 0.03
    melting_levels: int = 21
    p_max: float = 12.0
    volume_growth: float = 0.10
    fractions: dict[str, float] = field(default_factory=_default_fractions)
    dimer_sphere_diameter_nm: float = 36.0
    rod_length_nm: float = 80.0
    rod_diameter_nm: float = 20.0
    chunk_frames: int = 256

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.name != "fractions":
                setattr(self, f.name, _coerce(f.name, getattr(self, f.name), f.type))
        self.fractions = _check_fractions(self.fractions)
        self.validate()

    @classmethod
    def from_dict(cls, options: dict) -> SimulationParams:
        """Build from a mapping of field names (e.g. a config section); unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if key not in known:
                raise ConfigError(
                    f"unknown simulation parameter {key!r}; known: {', '.join(sorted(known))}"
                )
        return cls(**options)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise ConfigError(message)

        need(self.num_frames >= 1, f"num_frames must be >= 1, got {self.num_frames}")
        need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        need(self.mean_photons > 0, f"mean_photons must be positive, got {self.mean_photons}")
        need(self.fluence_shape >= 0,
             f"fluence_shape must be >= 0 (0 = no fluence jitter), got {self.fluence_shape}")
        need(0 <= self.background_photons < self.mean_photons,
             f"background_photons must lie in [0, mean_photons={self.mean_photons}), "
             f"got {self.background_photons}")
        for name in ("distance_mm", "pixel_um", "energy_kev", "cube_edge_nm",
                     "dimer_sphere_diameter_nm", "rod_length_nm", "rod_diameter_nm"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(0 < self.max_angle_deg < 90,
             f"max_angle_deg must lie in (0, 90), got {self.max_angle_deg}")
        need(self.binning >= 1, f"binning must be >= 1, got {self.binning}")
        need(self.beamstop_px >= 0, f"beamstop_px must be >= 0, got {self.beamstop_px}")
        need(self.gap_px >= 0, f"gap_px must be >= 0, got {self.gap_px}")
        need(self.grid_size >= 8, f"grid_size must be >= 8, got {self.grid_size}")
        for name in ("cube_edge_spread", "sphere_diameter_spread"):
            value = getattr(self, name)
            need(0 <= value < 1 / (SIZE_TRUNCATION + 1),
                 f"{name} (relative standard deviation) must lie in [0, 0.25), got {value}")
        need(self.melting_levels >= 2, f"melting_levels must be >= 2, got {self.melting_levels}")
        need(self.p_max > 2, f"p_max must be > 2 (2 is the sphere), got {self.p_max}")
        need(self.volume_growth > -1, f"volume_growth must be > -1, got {self.volume_growth}")
        need(self.chunk_frames >= 1, f"chunk_frames must be >= 1, got {self.chunk_frames}")

    # derived quantities -------------------------------------------------------------------
    def geometry(self) -> dict:
        return dict(distance_mm=self.distance_mm, pixel_um=self.pixel_um,
                    energy_kev=self.energy_kev, binning=self.binning)

    def voxel_nm(self) -> float:
        return geom.real_space_voxel_nm(self.grid_size, **self.geometry())

    def size_spread(self, population: str) -> float:
        if population in ("cube", "melting"):
            return self.cube_edge_spread
        if population == "sphere":
            return self.sphere_diameter_spread
        return 0.0

    def max_size_factor(self) -> float:
        spreads = [self.size_spread(p) for p, f in self.fractions.items() if f > 0]
        return 1.0 + SIZE_TRUNCATION * max(spreads, default=0.0)


def _coerce(name: str, value, type_name):
    """Accept ints for floats and integral floats for ints; refuse strings, bools and NaN."""
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", "")
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    if kind == "int":
        if float(value) != int(value):
            raise ConfigError(f"{name} must be an integer, got {value}")
        return int(value)
    return float(value)


def _check_fractions(fractions) -> dict[str, float]:
    if not isinstance(fractions, dict) or not fractions:
        raise ConfigError(f"fractions must map population names to fractions, got {fractions!r}")
    out = dict.fromkeys(POPULATIONS, 0.0)
    for name, value in fractions.items():
        if name not in LABELS:
            raise ConfigError(
                f"unknown population {name!r} in fractions; known: {', '.join(POPULATIONS)}"
            )
        value = _coerce(f"fractions[{name}]", value, "float")
        if value < 0:
            raise ConfigError(f"fraction of {name} is negative ({value})")
        out[name] = value
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"population fractions sum to {total:.6g}, not 1")
    return out


# ------------------------------------------------------------------------------------------
# shapes and their intensities


@dataclass
class ShapeLibrary:
    """The base (s = 1) intensity volumes the frames are sliced from, and what they are."""

    intens: list[np.ndarray]  # |F|^2 on the centred grid, unscaled
    label: np.ndarray
    t: np.ndarray
    particle_volume_nm3: np.ndarray
    exponent: np.ndarray
    index: dict[str, int]  # first volume of each population (melting: level 0)
    outer_radius_nm: np.ndarray  # largest distance of the surface from the centre


def melting_level_values(levels: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, levels)


#: the densities are voxelised this many times finer than the intensity grid's real-space voxel,
#: which keeps the spectrum's aliased copies away from the detector's q range: at the grid's own
#: voxel the faceted shapes' high-q intensity is off by ~30 %, at 4x finer by ~2-5 % (median)
REAL_SPACE_REFINE = 4


def build_shapes(
    params: SimulationParams,
    supersample: int = sh.DEFAULT_SUPERSAMPLE,
    refine: int = REAL_SPACE_REFINE,
) -> ShapeLibrary:
    """Voxelise every shape and transform it: cube, the melting levels, sphere, dimer, rod."""
    N = params.grid_size
    v = params.voxel_nm()
    fine_n, fine_v = N * refine, v / refine
    dq = geom.q_per_voxel_inv_nm(**params.geometry())
    a = params.cube_edge_nm
    kw = dict(supersample=supersample, full=False)
    entries = []  # (label, t, make density, volume, exponent, outer radius)
    entries.append(("cube", 0.0, lambda: sh.cube_density(a, fine_n, fine_v, **kw), a**3,
                    np.nan, a * 3**0.5 / 2))
    for t in melting_level_values(params.melting_levels):
        p = float(sh.superball_exponent(t, params.p_max))
        r = float(sh.melting_radius(t, a, params.p_max, params.volume_growth))
        vol = float(sh.melting_volume(t, a, params.volume_growth))
        entries.append(("melting", t,
                        lambda r=r, p=p: sh.superball_density(r, p, fine_n, fine_v, **kw),
                        vol, p, r * 3 ** (0.5 - 1 / p)))
    v1 = float(sh.melting_volume(1.0, a, params.volume_growth))
    d = sh.sphere_diameter_for_volume(v1)
    entries.append(("sphere", 1.0, lambda: sh.sphere_density(d, fine_n, fine_v, **kw), v1,
                    2.0, d / 2))
    dd = params.dimer_sphere_diameter_nm
    entries.append(("dimer", np.nan, lambda: sh.dimer_density(dd, fine_n, fine_v, **kw),
                    2 * np.pi / 6 * dd**3, np.nan, dd))
    rl, rd = params.rod_length_nm, params.rod_diameter_nm
    entries.append(("rod", np.nan, lambda: sh.rod_density(rl, rd, fine_n, fine_v, **kw),
                    np.pi / 4 * rd**2 * rl, np.nan, float(np.hypot(rl / 2, rd / 2))))
    index = {}
    for i, e in enumerate(entries):
        index.setdefault(e[0], i)
    intens = [
        it.intensity_on_grid(e[2](), fine_v, dq, N, box_average=True, unit_voxel_nm=v)
        for e in entries
    ]
    return ShapeLibrary(
        intens=intens,
        label=np.array([LABELS[e[0]] for e in entries], dtype=np.int8),
        t=np.array([e[1] for e in entries]),
        particle_volume_nm3=np.array([e[3] for e in entries]),
        exponent=np.array([e[4] for e in entries]),
        index=index,
        outer_radius_nm=np.array([e[5] for e in entries]),
    )


# ------------------------------------------------------------------------------------------
# per-frame draws


@dataclass
class FrameDraws:
    label: np.ndarray
    t: np.ndarray
    shape_index: np.ndarray
    size: np.ndarray
    fluence: np.ndarray
    quaternion: np.ndarray


def truncated_normal(n: int, limit: float, rng: np.random.Generator) -> np.ndarray:
    """Standard normal deviates redrawn until they lie within +-limit."""
    z = rng.standard_normal(n)
    while True:
        out = np.abs(z) > limit
        if not out.any():
            return z
        z[out] = rng.standard_normal(int(out.sum()))


def random_streams(seed: int) -> list[np.random.Generator]:
    """Independent generators: populations, sizes, melting levels, fluence, orientations, noise."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)]


def draw_frames(params: SimulationParams, library: ShapeLibrary) -> FrameDraws:
    """Every random choice except the photon noise, each from its own stream of the seed."""
    n = params.num_frames
    pop_rng, size_rng, level_rng, fluence_rng, rot_rng = random_streams(params.seed)[:5]
    probs = np.array([params.fractions[p] for p in POPULATIONS])
    label = pop_rng.choice(len(POPULATIONS), size=n, p=probs / probs.sum()).astype(np.int8)

    levels = melting_level_values(params.melting_levels)
    t = np.full(n, np.nan)
    shape_index = np.zeros(n, dtype=np.int16)
    size = np.ones(n)
    # draw every stream for all frames so that changing one fraction does not reshuffle the rest
    z = truncated_normal(n, SIZE_TRUNCATION, size_rng)
    level = np.rint(level_rng.uniform(0.0, 1.0, size=n) * (len(levels) - 1)).astype(int)
    for name in POPULATIONS:
        sel = label == LABELS[name]
        shape_index[sel] = library.index[name]
        size[sel] = 1.0 + params.size_spread(name) * z[sel]
    melt = label == LABELS["melting"]
    shape_index[melt] += level[melt]
    t[melt] = levels[level[melt]]
    t[label == LABELS["cube"]] = 0.0
    t[label == LABELS["sphere"]] = 1.0
    return FrameDraws(
        label=label,
        t=t,
        shape_index=shape_index,
        size=size,
        fluence=fr.fluence_factors(n, params.fluence_shape, fluence_rng),
        quaternion=fr.random_quaternions(n, rot_rng),
    )


# ------------------------------------------------------------------------------------------
# detector and photon scale


def check_grid_covers(det: Detector, grid_size: int, max_size: float) -> int:
    """Keep every recorded pixel inside the intensity grid; returns how many pixels were dropped.

    A pixel samples |q| s <= |q| max_size; used pixels (mask 0) beyond the grid are a ConfigError,
    merged-only corner pixels (mask 1) beyond it become bad (mask 2), in place.
    """
    reach = geom.q_magnitude(det) * max_size
    limit = it.safe_radius(grid_size)
    beyond = reach > limit + 1e-9
    used_beyond = beyond & (det.mask == geom.MASK_USED)
    if used_beyond.any():
        need = reach[det.mask == geom.MASK_USED].max()
        raise ConfigError(
            f"grid_size={grid_size} reaches |q| = {limit} voxels but the detector's max angle "
            f"(with the size spread) needs {need:.1f}; use grid_size >= "
            f"{2 * int(np.ceil(need)) + 2} or lower max_angle_deg"
        )
    dropped = beyond & (det.mask == geom.MASK_MERGED_ONLY)
    det.mask[dropped] = geom.MASK_BAD
    return int(dropped.sum())


def build_detector(params: SimulationParams) -> Detector:
    det = geom.make_detector(
        distance_mm=params.distance_mm,
        pixel_um=params.pixel_um,
        energy_kev=params.energy_kev,
        max_angle_deg=params.max_angle_deg,
        binning=params.binning,
        beamstop_px=params.beamstop_px,
        gap_px=params.gap_px,
    )
    check_grid_covers(det, params.grid_size, params.max_size_factor())
    if not (det.mask != geom.MASK_BAD).any():
        raise ConfigError("every detector pixel is masked; lower beamstop_px or gap_px")
    return det


def check_shapes_fit(params: SimulationParams, refine: int = REAL_SPACE_REFINE) -> None:
    """ConfigError unless every particle fits in the real-space box (before any work is done)."""
    a = params.cube_edge_nm
    radii = sh.melting_radius(melting_level_values(params.melting_levels), a, params.p_max,
                              params.volume_growth)
    sphere_volume = float(sh.melting_volume(1.0, a, params.volume_growth))
    half_widths = {
        "cube": a / 2,
        "melting particle": float(np.max(radii)),
        "sphere": sh.sphere_diameter_for_volume(sphere_volume) / 2,
        "dimer": params.dimer_sphere_diameter_nm,
        "rod": max(params.rod_length_nm, params.rod_diameter_nm) / 2,
    }
    box = params.voxel_nm() * params.grid_size
    for name, h in half_widths.items():
        try:
            sh.box_half_width(h, params.grid_size * refine, params.voxel_nm() / refine)
        except ConfigError:
            raise ConfigError(
                f"the {name} ({2 * h:.0f} nm across) does not fit in the {box:.0f} nm real-space "
                "box (1/dq, set by distance, pixel size, binning and energy); lower the binning "
                f"or shrink the {name}"
            ) from None


def background_per_pixel(det: Detector, photons_per_frame: float) -> np.ndarray:
    """A background of photons_per_frame spread over the recorded pixels in proportion to corr."""
    weight = np.where(det.mask == geom.MASK_BAD, 0.0, det.corr)
    return photons_per_frame * weight / weight.sum()


def orientation_averaged_totals(
    library: ShapeLibrary, det: Detector, sizes_needed: dict[int, np.ndarray]
) -> dict[int, np.ndarray]:
    """Expected unscaled signal of a randomly oriented frame, sum_t corr_t s^6 <I>(s |q_t|).

    Returned per volume at the requested size factors. <I>(r) is the spherical average of the
    intensity (the orientation average at a pixel with |q| = r), tabulated on a fine radial grid
    (it.profile_radii); the sums are good to about 0.2 %.
    """
    recorded = det.mask != geom.MASK_BAD
    qmag = geom.q_magnitude(det)[recorded]
    weight = det.corr[recorded]
    s_max = max(float(s.max()) for s in sizes_needed.values())
    radii = it.profile_radii(qmag.max() * s_max)
    keys = sorted(sizes_needed)
    operator = it.spherical_average_operator(library.intens[0].shape[0], radii)
    stack = np.stack([library.intens[k].ravel() for k in keys], axis=1)
    profiles = operator @ stack
    out = {}
    for column, k in enumerate(keys):
        sizes = sizes_needed[k]
        s_grid = np.linspace(sizes.min(), sizes.max(), 17)
        at_pixels = np.interp(np.multiply.outer(s_grid, qmag), radii, profiles[:, column])
        g = s_grid**6 * (at_pixels @ weight)
        out[k] = np.interp(sizes, s_grid, g)
    return out


# ------------------------------------------------------------------------------------------
# the driver


def simulate_dataset(params: SimulationParams | dict, out_dir) -> dict:
    """Simulate a heterogeneous dataset into out_dir; returns the summary (simulate.json)."""
    if isinstance(params, dict):
        params = SimulationParams.from_dict(params)
    start = time.perf_counter()
    out = Path(out_dir)
    # every impossible setting fails here, before anything is logged or written
    det = build_detector(params)
    check_shapes_fit(params)

    dq = geom.q_per_voxel_inv_nm(**params.geometry())
    voxel = params.voxel_nm()
    wavelength = geom.wavelength_nm(params.energy_kev)
    log.info("wavelength %.4f nm, q voxel %.5f 1/nm, real-space voxel %.3f nm, box %.1f nm",
             wavelength, dq, voxel, voxel * params.grid_size)
    bad = det.mask == geom.MASK_BAD
    log.info("detector: %d x %d pixels (%d used, %d merged only, %d bad), max |q| %.1f voxels",
             geom.detector_side(det), geom.detector_side(det), (det.mask == 0).sum(),
             (det.mask == 1).sum(), bad.sum(), geom.q_magnitude(det)[~bad].max())

    log.info("voxelising and transforming %d shapes on a %d^3 grid",
             params.melting_levels + 4, params.grid_size)
    library = build_shapes(params)
    box = voxel * params.grid_size
    span = 2 * library.outer_radius_nm.max()
    if 2 * span > box:
        # speckles narrower than two voxels: trilinear slicing blurs them
        log.warning("particles span up to %.0f nm, more than half the %.0f nm box: their "
                    "intensities are sampled below the Shannon rate", span, box)

    draws = draw_frames(params, library)
    n = params.num_frames
    used_shapes = np.unique(draws.shape_index)
    totals = orientation_averaged_totals(
        library, det, {int(k): draws.size[draws.shape_index == k] for k in used_shapes}
    )
    signal = np.empty(n)
    for k in used_shapes:
        sel = draws.shape_index == k
        signal[sel] = totals[int(k)]
    signal *= draws.fluence
    target = params.mean_photons - params.background_photons
    intensity_scale = target / signal.mean()
    log.info("intensity scale %.4g photons per |F|^2 unit for %.0f signal photons per frame",
             intensity_scale, target)
    volumes = library.intens
    for v in volumes:
        v *= intensity_scale  # in place: the volumes are the largest arrays held
    background = None
    if params.background_photons > 0:
        background = background_per_pixel(det, params.background_photons)
        det.background = background

    # only recorded pixels are sliced; bad pixels (mask 2) record nothing
    recorded = np.flatnonzero(~bad)
    q = np.stack([det.qx, det.qy, det.qz])[:, recorded]
    corr = det.corr[recorded]
    if background is not None:
        background = background[recorded]
    noise_rng = random_streams(params.seed)[5]
    photons_per_frame = np.zeros(n, dtype=np.int32)
    expected = np.zeros(n)
    t_setup = time.perf_counter()
    log.info("simulating %d frames in chunks of %d", n, params.chunk_frames)
    out.mkdir(parents=True, exist_ok=True)
    # frames stream to disk chunk by chunk: memory does not grow with the number of frames
    with (
        PhotonWriter(out / "photons.h5", det.num_pix) as writer,
        tqdm(total=n, unit="frame", desc="simulate", disable=None) as bar,
    ):
        for first in range(0, n, params.chunk_frames):
            last = min(n, first + params.chunk_frames)
            rotations = fr.quaternion_to_matrix(draws.quaternion[first:last])
            index = draws.shape_index[first:last]
            lam = np.empty((last - first, recorded.size))
            for k in np.unique(index):
                sel = np.flatnonzero(index == k)
                lam[sel] = fr.expected_photons(
                    volumes[k], q, corr, rotations[sel], draws.size[first:last][sel],
                    draws.fluence[first:last][sel], background,
                )
            counts = np.zeros((last - first, det.num_pix), dtype=np.int32)
            counts[:, recorded] = fr.sample_photons(lam, noise_rng)
            expected[first:last] = lam.sum(axis=1)
            photons_per_frame[first:last] = counts.sum(axis=1)
            writer.append(SparsePhotons.from_dense(counts))
            bar.update(last - first)
    t_frames = time.perf_counter()

    attrs = {
        "label_names": json.dumps(list(POPULATIONS)),
        "wavelength_nm": wavelength,
        "detector_distance_mm": params.distance_mm,
        "detector_distance_px": det.detd,
        "pixel_um": params.pixel_um,
        "binning": params.binning,
        "pixel_size_um": params.pixel_um * params.binning,
        "voxel_size_nm": voxel,
        "q_per_voxel_inv_nm": dq,
        "grid_size": params.grid_size,
        "grid_centre": it.grid_centre(params.grid_size),
        "seed": params.seed,
        "mean_photons": params.mean_photons,
        "intensity_scale": intensity_scale,
        "quaternion_convention": "scalar-first (w, x, y, z); frame d samples I(R_d q_t)",
        "params": json.dumps(params.to_dict(), sort_keys=True),
    }
    truth_frames = {
        "label": draws.label,
        "t": draws.t,
        "quaternion": draws.quaternion,
        "scale": draws.fluence,
        "size": draws.size,
        "shape_index": draws.shape_index,
        "photons": photons_per_frame,
        "expected_photons": expected,
    }
    volume_info = {
        "label": library.label,
        "t": library.t,
        "particle_volume_nm3": library.particle_volume_nm3,
        "exponent": library.exponent,
    }
    log.info("writing detector.h5 and truth.h5 to %s", out)
    write_detector(det, out / "detector.h5")
    write_truth(out / "truth.h5", truth_frames, volumes, volume_info, attrs)

    t_end = time.perf_counter()
    seconds = t_end - start
    summary = {
        "num_frames": n,
        "mean_photons_requested": params.mean_photons,
        "photons_per_frame_mean": float(photons_per_frame.mean()),
        "photons_per_frame_std": float(photons_per_frame.std()),
        "photons_per_frame_min": int(photons_per_frame.min()),
        "photons_per_frame_max": int(photons_per_frame.max()),
        "populations": {name: int((draws.label == i).sum()) for i, name in enumerate(POPULATIONS)},
        "num_pix": det.num_pix,
        "detector_side": geom.detector_side(det),
        "pixels_by_mask": {str(m): int((det.mask == m).sum()) for m in (0, 1, 2)},
        "grid_size": params.grid_size,
        "num_volumes": len(volumes),
        "voxel_size_nm": voxel,
        "q_per_voxel_inv_nm": dq,
        "seconds": seconds,
        "seconds_by_step": {
            "setup": t_setup - start,  # geometry, shapes, intensities, photon scale
            "frames": t_frames - t_setup,  # slicing, Poisson draws, writing photons.h5
            "truth": t_end - t_frames,  # detector.h5 and truth.h5 (with the volumes)
        },
        "frames_per_second": n / seconds,
        "files": {name: str(out / name) for name in ("photons.h5", "detector.h5", "truth.h5")},
    }
    with atomic_path(out / "simulate.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%d frames, %.0f photons per frame on average, in %.1f s (%.0f frames/s)", n,
             summary["photons_per_frame_mean"], seconds, summary["frames_per_second"])
    return summary
