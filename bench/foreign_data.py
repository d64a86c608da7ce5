"""Validation datasets that the demo generator did not make (issue 14's matrix).

Two sources, each with full truth in spiscape's ``truth.h5`` layout (so the pipeline's own
scorers read them) and the Dragonfly files a facility would hand over (``photons.h5``,
``detector.h5``):

* ``dragonfly``: particles built here as coarse-grained PDB files (pseudo-atoms of gold on a
  jittered lattice, a third of the density voxel apart), turned into electron densities and 3D
  intensities by **Dragonfly's own simulator** (``dragonfly.utils.make_densities``,
  ``make_intensities``), on **Dragonfly's detector** (``make_detector``: a square detector, mask 1
  beyond the inscribed circle, mask 2 inside the beamstop), all run from Dragonfly's separate
  environment as external programs (GPL: none of its code is here). The frames are then sliced
  from those intensities at recorded random orientations, with a size factor per particle
  (``s^6 I(s R q)``), a Gamma fluence and Poisson noise by spiscape's sampling functions.
  Dragonfly's intensity differs from the demo's in every detail that matters to a pipeline tuned
  on the demo: trilinear splatting of atoms onto a density voxel of half the detector's
  resolution, a Gaussian low-pass, an FFT box set by the detector, Dragonfly's polarisation and
  solid-angle factor, a circular detector in a square frame.

  **The density box is padded** (two hydrogen atoms at opposite corners of a box a few density
  voxels wider than the particle, :func:`write_pdb`'s ``pad_nm``). ``make_densities`` grids the
  atoms in their own bounding box and low-passes that box by FFT, i.e. periodically: a cube
  fills its box, so its periodic image has no faces to blur, and it kept a sharp surface while
  every other shape (spheres, superballs, contaminants) was blurred by the low-pass. Until
  2026-12-08 the matrix's Dragonfly sets were made that way; their cube and sphere were then not
  one object's blur apart (the truth's own intensities, Porod-read with their true F(0), gave
  the sphere / cube ratio +6 % on ``df72many``, +20 % after the sphere's own envelope
  correction; padded, -3 % to -1 % for any envelope: docs/validation.md, "Dragonfly's unpadded
  cube"). Two electrons against some 10^7 of the particle change no intensity measurably.
* ``spiscape``: the demo's simulator at settings far from the demo's (geometry, photons, spreads,
  contaminant mix), a second family so that one simulator's quirks do not decide the defaults.

Each dataset goes to ``OUT/NAME/`` with ``photons.h5``, ``detector.h5``, ``truth.h5`` and
``dataset.json`` (its spec and ``q_per_pixel``, the only geometry the pipeline is told).

    python bench/foreign_data.py --out bench/data/validation [--only df64 ...]

Dragonfly's environment: ``python bench/dragonfly_baseline.py --install-hint`` (or
``$DRAGONFLY_VENV``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from spiscape.io import PhotonWriter, SparsePhotons, read_detector, write_detector  # noqa: E402
from spiscape.io.truth import write_truth  # noqa: E402
from spiscape.simulate import frames as fr  # noqa: E402
from spiscape.simulate import shapes as sh  # noqa: E402
from spiscape.simulate.run import truncated_normal  # noqa: E402

log = logging.getLogger("foreign_data")

LABEL_NAMES = ["cube", "melting", "sphere", "dimer", "rod", "spheroid", "trimer"]
LABELS = {n: i for i, n in enumerate(LABEL_NAMES)}
CONTAMINANTS = ("dimer", "rod", "spheroid", "trimer")
SIZE_TRUNCATION = 3.0
#: density voxels of empty space around each particle in Dragonfly's density box (its low-pass
#: is periodic over the box; its Gaussian is about half a voxel wide, applied twice)
PAD_VOXELS = 4

#: The matrix. Geometry in Dragonfly's units (detd and pixsize in mm, lambda in Angstrom,
#: detsize and stoprad in pixels); sizes in nm; spreads are relative standard deviations.
#: Chosen to span the issue's ranges, not to suit the pipeline: detector side 64-128 px, two
#: pixel sizes (0.8 and 0.4 mm, a 2x binning), 300-3000 photons (128^2 at both ends),
#: spreads 1-8 %, contaminants 5-25 % of two or more kinds, melting 10-50 %.
DATASETS = {
    "df64": dict(
        source="dragonfly", seed=101, num_frames=5000, mean_photons=1500,
        detd=705.0, wavelength=2.066, detsize=64, pixsize=0.8, stoprad=3,
        cube_edge=42.0, p_max=12.0, volume_growth=0.10, melting_levels=11,
        spread={"cube": 0.02, "melting": 0.02, "sphere": 0.04},
        fractions={"cube": 0.3, "melting": 0.3, "sphere": 0.25, "dimer": 0.1, "spheroid": 0.05},
    ),
    "df128b2": dict(
        source="dragonfly", seed=102, num_frames=4000, mean_photons=3000,
        detd=705.0, wavelength=2.066, detsize=128, pixsize=0.4, stoprad=6,
        cube_edge=38.0, p_max=16.0, volume_growth=0.08, melting_levels=11,
        spread={"cube": 0.01, "melting": 0.01, "sphere": 0.06},
        fractions={"cube": 0.35, "melting": 0.2, "sphere": 0.3, "rod": 0.1, "trimer": 0.05},
    ),
    "df96low": dict(
        source="dragonfly", seed=103, num_frames=8000, mean_photons=400,
        detd=600.0, wavelength=2.48, detsize=96, pixsize=0.6, stoprad=4,
        cube_edge=50.0, p_max=12.0, volume_growth=0.12, melting_levels=11,
        spread={"cube": 0.04, "melting": 0.04, "sphere": 0.08},
        fractions={"cube": 0.25, "melting": 0.5, "sphere": 0.15, "dimer": 0.05, "rod": 0.05},
    ),
    "df80contam": dict(
        source="dragonfly", seed=104, num_frames=6000, mean_photons=2000,
        detd=800.0, wavelength=1.77, detsize=80, pixsize=0.7, stoprad=3,
        cube_edge=40.0, p_max=10.0, volume_growth=0.10, melting_levels=11,
        spread={"cube": 0.03, "melting": 0.03, "sphere": 0.06},
        fractions={"cube": 0.35, "melting": 0.1, "sphere": 0.3, "dimer": 0.1, "rod": 0.08,
                   "spheroid": 0.07},
    ),
    # a large detector at a low photon count: the photon-sparse regime of the EMC issue
    "df128low": dict(
        source="dragonfly", seed=107, num_frames=6000, mean_photons=300,
        detd=650.0, wavelength=2.3, detsize=128, pixsize=0.4, stoprad=5,
        cube_edge=46.0, p_max=14.0, volume_growth=0.10, melting_levels=11,
        spread={"cube": 0.02, "melting": 0.02, "sphere": 0.05},
        fractions={"cube": 0.3, "melting": 0.3, "sphere": 0.2, "dimer": 0.1, "rod": 0.1},
    ),
    # the upper end of frames per dataset (20 000), mid photons
    "df72many": dict(
        source="dragonfly", seed=108, num_frames=20000, mean_photons=800,
        detd=640.0, wavelength=2.2, detsize=72, pixsize=0.6, stoprad=3,
        cube_edge=44.0, p_max=12.0, volume_growth=0.10, melting_levels=11,
        spread={"cube": 0.03, "melting": 0.03, "sphere": 0.05},
        fractions={"cube": 0.3, "melting": 0.3, "sphere": 0.25, "trimer": 0.08,
                   "spheroid": 0.07},
    ),
    "sim72lowphot": dict(
        source="spiscape", num_frames=6000, seed=105, mean_photons=300,
        distance_mm=500.0, energy_kev=7.0, pixel_um=150.0, binning=4, max_angle_deg=2.3,
        cube_edge_nm=36.0, cube_edge_spread=0.01, sphere_diameter_spread=0.05,
        volume_growth=0.08, p_max=14.0, grid_size=80,
        fractions={"cube": 0.3, "melting": 0.35, "sphere": 0.2, "dimer": 0.1, "rod": 0.05},
    ),
    "sim64spread": dict(
        source="spiscape", num_frames=8000, seed=106, mean_photons=2500,
        distance_mm=705.0, energy_kev=6.0, pixel_um=200.0, binning=4, max_angle_deg=2.2,
        cube_edge_nm=44.0, cube_edge_spread=0.05, sphere_diameter_spread=0.08, grid_size=88,
        fractions={"cube": 0.25, "melting": 0.25, "sphere": 0.25, "dimer": 0.15, "rod": 0.1},
    ),
}


# ------------------------------------------------------------------------------------------
# particles as point clouds (pseudo-atoms), in nm


def _lattice(half: float, spacing: float, rng) -> np.ndarray:
    """Jittered cubic lattice points filling [-half, half]^3 (jitter +-spacing/2: no lattice
    order for the density grid to alias)."""
    axis = np.arange(-half, half + spacing, spacing)
    pts = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    return pts + rng.uniform(-spacing / 2, spacing / 2, pts.shape)


def superball_points(r: float, p: float, spacing: float, rng) -> np.ndarray:
    pts = _lattice(r, spacing, rng)
    return pts[(np.abs(pts / r) ** p).sum(1) <= 1.0]


def ellipsoid_points(axes, spacing: float, rng) -> np.ndarray:
    a = np.asarray(axes, dtype=float)
    pts = _lattice(a.max(), spacing, rng)
    return pts[((pts / a) ** 2).sum(1) <= 1.0]


def spheres_points(diameter: float, centres, spacing: float, rng) -> np.ndarray:
    one = ellipsoid_points([diameter / 2] * 3, spacing, rng)
    return np.concatenate([one + np.asarray(c) for c in centres])


def rod_points(length: float, diameter: float, spacing: float, rng) -> np.ndarray:
    pts = _lattice(length / 2, spacing, rng)
    return pts[(np.hypot(pts[:, 0], pts[:, 1]) <= diameter / 2) & (np.abs(pts[:, 2]) <= length / 2)]


def shape_catalogue(spec: dict, spacing: float, rng) -> list[dict]:
    """Every shape of a dataset: label, t, geometric volume (nm^3) and its points."""
    a = spec["cube_edge"]
    out = [dict(label="cube", t=0.0, volume=a ** 3, points=superball_points(a / 2, 200.0,
                                                                           spacing, rng))]
    for t in np.linspace(0.0, 1.0, spec["melting_levels"]):
        p = float(sh.superball_exponent(t, spec["p_max"]))
        r = float(sh.melting_radius(t, a, spec["p_max"], spec["volume_growth"]))
        out.append(dict(label="melting", t=float(t),
                        volume=float(sh.melting_volume(t, a, spec["volume_growth"])),
                        points=superball_points(r, p, spacing, rng)))
    v1 = float(sh.melting_volume(1.0, a, spec["volume_growth"]))
    d = sh.sphere_diameter_for_volume(v1)
    out.append(dict(label="sphere", t=1.0, volume=v1,
                    points=ellipsoid_points([d / 2] * 3, spacing, rng)))
    kinds = {k for k in spec["fractions"] if k in CONTAMINANTS}
    if "dimer" in kinds:
        dd = 0.8 * a
        out.append(dict(label="dimer", t=math.nan, volume=2 * math.pi / 6 * dd ** 3,
                        points=spheres_points(dd, [(0, 0, -dd / 2), (0, 0, dd / 2)], spacing,
                                              rng)))
    if "rod" in kinds:
        length, diam = 1.9 * a, 0.45 * a
        out.append(dict(label="rod", t=math.nan, volume=math.pi / 4 * diam ** 2 * length,
                        points=rod_points(length, diam, spacing, rng)))
    if "spheroid" in kinds:
        axes = (0.45 * a, 0.45 * a, 0.85 * a)
        out.append(dict(label="spheroid", t=math.nan, volume=4 / 3 * math.pi * np.prod(axes),
                        points=ellipsoid_points(axes, spacing, rng)))
    if "trimer" in kinds:
        dd = 0.6 * a
        c = [(0, dd / math.sqrt(3), 0), (dd / 2, -dd / (2 * math.sqrt(3)), 0),
             (-dd / 2, -dd / (2 * math.sqrt(3)), 0)]
        out.append(dict(label="trimer", t=math.nan, volume=3 * math.pi / 6 * dd ** 3,
                        points=spheres_points(dd, c, spacing, rng)))
    return out


def write_pdb(points_nm: np.ndarray, path: Path, pad_nm: float = 0.0) -> None:
    """Pseudo-atoms of gold as PDB ATOM records (Angstrom coordinates, occupancy 1, element AU);
    with ``pad_nm`` two hydrogen atoms at (-h, -h, -h) and (h, h, h), h the particle's largest
    |coordinate| plus ``pad_nm``: Dragonfly's density box is the atoms' bounding box, which
    these widen (module docstring)."""
    xyz = points_nm * 10.0
    # fixed columns: serial 7-11, name 13-16, residue 18-20, chain 22, x/y/z 31-54,
    # occupancy 55-60, element 77-78 (1-based)
    lines = [f"ATOM  {i % 100000:5d} AU    AU A{i % 10000:4d}    "
             f"{x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00          AU"
             for i, (x, y, z) in enumerate(xyz, start=1)]
    if pad_nm > 0:
        h = 10.0 * (float(np.abs(points_nm).max()) + pad_nm)
        lines += [f"ATOM  {i:5d} H     H  B{i:4d}    {c:8.3f}{c:8.3f}{c:8.3f}  1.00  0.00"
                  f"           H" for i, c in ((1, -h), (2, h))]
    path.write_text("\n".join(lines) + "\nEND\n")


# ------------------------------------------------------------------------------------------
# Dragonfly's simulator, run from its own environment


def dragonfly_bin(name: str) -> Path:
    venv = Path(os.environ.get("DRAGONFLY_VENV", "/opt/dragonfly-venv"))
    exe = venv / "bin" / f"dragonfly.{name}"
    if not exe.exists():
        raise SystemExit(f"{exe} not found: build Dragonfly's environment first "
                         "(python bench/dragonfly_baseline.py --install-hint)")
    return exe


def dragonfly_aux() -> Path:
    py = Path(os.environ.get("DRAGONFLY_VENV", "/opt/dragonfly-venv")) / "bin" / "python"
    out = subprocess.run([str(py), "-c", "import dragonfly, os; "
                          "print(os.path.join(os.path.dirname(dragonfly.__file__), 'aux'))"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def q_params(spec: dict) -> dict:
    """Dragonfly's compute_q_params (read_config.py), restated: Angstrom^-1 and Angstrom."""
    half = spec["pixsize"] * int((spec["detsize"] - 1) / 2)
    max_angle = math.atan(math.hypot(half, half) / spec["detd"])
    min_angle = math.atan(spec["pixsize"] / spec["detd"])
    q_max = 2 * math.sin(max_angle / 2) / spec["wavelength"]
    q_sep = 2 * math.sin(min_angle / 2) / spec["wavelength"]
    return dict(q_max=q_max, q_sep=q_sep, fov=1 / q_sep, half_p_res=0.5 / q_max)


def write_config(spec: dict, work: Path, pdb: Path | None, aux: Path) -> Path:
    cfg = work / "config.ini"
    text = (
        "[parameters]\n"
        f"detd = {spec['detd']}\nlambda = {spec['wavelength']}\ndetsize = {spec['detsize']}\n"
        f"pixsize = {spec['pixsize']}\nstoprad = {spec['stoprad']}\npolarization = x\n\n"
        "[make_densities]\n"
        f"in_pdb_file = {pdb or 'none.pdb'}\nscatt_dir = {aux}\n"
        "out_density_file = density.bin\nnum_threads = 2\n\n"
        "[make_intensities]\nin_density_file = make_densities:::out_density_file\n"
        "out_intensity_file = intensity.bin\nnum_threads = 2\n\n"
        "[make_detector]\nout_detector_file = det.h5\n"
    )
    cfg.write_text(text)
    return cfg


def run_dragonfly(tool: str, cfg: Path) -> None:
    res = subprocess.run([str(dragonfly_bin(f"utils.{tool}")), "-c", str(cfg), "-y"],
                         cwd=cfg.parent, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"dragonfly {tool} failed in {cfg.parent}:\n{res.stderr[-2000:]}")


def dragonfly_volumes(spec: dict, shapes: list[dict], work: Path) -> tuple[list, Path]:
    """Dragonfly's 3D intensity of every shape (fov_len^3, centred at fov_len // 2) and its
    detector file."""
    aux = dragonfly_aux()
    work.mkdir(parents=True, exist_ok=True)
    cfg = write_config(spec, work, None, aux)
    run_dragonfly("make_detector", cfg)
    volumes = []
    for k, shape in enumerate(shapes):
        sub = work / f"shape{k:02d}"
        sub.mkdir(exist_ok=True)
        pdb = sub / "particle.pdb"
        write_pdb(shape["points"], pdb, pad_nm=PAD_VOXELS * q_params(spec)["half_p_res"] / 10)
        cfg_k = write_config(spec, sub, pdb, aux)
        run_dragonfly("make_densities", cfg_k)
        run_dragonfly("make_intensities", cfg_k)
        raw = np.fromfile(sub / "intensity.bin", dtype=np.float64)
        n = round(raw.size ** (1 / 3))
        volumes.append(raw.reshape(n, n, n).astype(np.float32))
        for f in (pdb, sub / "density.bin", sub / "intensity.bin"):
            f.unlink()
        log.info("  shape %d (%s, t=%.2f): %d pseudo-atoms, intensity %d^3", k, shape["label"],
                 shape["t"], len(shape["points"]), n)
    return volumes, work / "det.h5"


# ------------------------------------------------------------------------------------------
# frames


def crop_centre(volume: np.ndarray, size: int) -> np.ndarray:
    c, h = volume.shape[0] // 2, size // 2
    return volume[c - h:c + h + 1, c - h:c + h + 1, c - h:c + h + 1]


def make_dragonfly_dataset(name: str, spec: dict, out: Path) -> dict:
    start = time.perf_counter()
    rng = np.random.default_rng(spec["seed"])
    qp = q_params(spec)
    # pseudo-atoms a third of Dragonfly's density voxel apart (half_p_res, Angstrom -> nm)
    spacing = qp["half_p_res"] / 10 / 3
    shapes = shape_catalogue(spec, spacing, rng)
    volumes, det_path = dragonfly_volumes(spec, shapes, out / "dragonfly_work")
    fov_len = volumes[0].shape[0]
    # Dragonfly's volume voxel is the detector's q unit (make_data slices it at the detector's
    # q in voxels), but its FFT box is fov_len * half_p_res, not fov: the particle the frames
    # show is the PDB's scaled by fov / (fov_len * half_p_res)
    apparent = qp["fov"] / (fov_len * qp["half_p_res"])
    det = read_detector(det_path)
    spread = spec["spread"]
    s_max = 1 + SIZE_TRUNCATION * max(spread.values())
    qmag = np.sqrt(det.qx ** 2 + det.qy ** 2 + det.qz ** 2)
    # the truth keeps only the volume the recorded pixels reach at the largest size factor;
    # pixels beyond it (the square's far corners) become bad, as no intensity is known there
    size = 2 * int(math.ceil(qmag[det.mask == 0].max() * s_max)) + 5
    size = min(size, fov_len - 2 + (fov_len % 2 == 0))
    det.mask[(qmag * s_max > size // 2 - 1) & (det.mask < 2)] = 2
    volumes = [crop_centre(v, size) for v in volumes]
    return sample_frames(name, spec, out, det, volumes, shapes, rng, start, extra={
        "q_per_voxel_inv_nm": 10 * qp["q_sep"], "apparent_scale": apparent,
        "dragonfly_fov_len": fov_len, "half_p_res_A": qp["half_p_res"],
        "pseudo_atom_spacing_nm": spacing,
    })


def sample_frames(name, spec, out: Path, det, volumes, shapes, rng, start, extra) -> dict:
    n = spec["num_frames"]
    labels = np.array([LABELS[s["label"]] for s in shapes], dtype=np.int8)
    pops = list(spec["fractions"])
    probs = np.array([spec["fractions"][p] for p in pops], dtype=float)
    pop = rng.choice(len(pops), size=n, p=probs / probs.sum())
    label = np.array([LABELS[pops[i]] for i in pop], dtype=np.int8)
    melt_idx = np.flatnonzero(labels == LABELS["melting"])
    shape_index = np.zeros(n, dtype=np.int16)
    for lab in np.unique(label):
        sel = label == lab
        if lab == LABELS["melting"]:
            shape_index[sel] = rng.choice(melt_idx, size=int(sel.sum()))
        else:
            shape_index[sel] = int(np.flatnonzero(labels == lab)[0])
    t = np.array([shapes[k]["t"] for k in shape_index])
    z = truncated_normal(n, SIZE_TRUNCATION, rng)
    sizes = 1.0 + np.array([spec["spread"].get(LABEL_NAMES[lab], 0.01) for lab in label]) * z
    fluence = fr.fluence_factors(n, 4.0, rng)
    quats = fr.random_quaternions(n, rng)
    recorded = np.flatnonzero(det.mask < 2)
    q = np.stack([det.qx, det.qy, det.qz])[:, recorded]
    corr = det.corr[recorded] / det.corr[recorded].mean()
    # photon scale from a pilot of frames: the mean count is what the spec asks for
    pilot = rng.choice(n, size=min(n, 300), replace=False)
    signal = np.zeros(len(pilot))
    rots = fr.quaternion_to_matrix(quats[pilot])
    for i, d in enumerate(pilot):
        signal[i] = fr.expected_photons(volumes[shape_index[d]], q, corr, rots[i:i + 1],
                                        sizes[d:d + 1], fluence[d:d + 1]).sum()
    scale = spec["mean_photons"] / signal.mean()
    volumes = [v * np.float32(scale) for v in volumes]
    photons = np.zeros(n, dtype=np.int32)
    expected = np.zeros(n)
    out.mkdir(parents=True, exist_ok=True)
    with PhotonWriter(out / "photons.h5", det.num_pix) as writer:
        for first in range(0, n, 256):
            last = min(n, first + 256)
            rot = fr.quaternion_to_matrix(quats[first:last])
            lam = np.empty((last - first, recorded.size))
            idx = shape_index[first:last]
            for k in np.unique(idx):
                sel = np.flatnonzero(idx == k)
                lam[sel] = fr.expected_photons(volumes[k], q, corr, rot[sel],
                                               sizes[first:last][sel], fluence[first:last][sel])
            counts = np.zeros((last - first, det.num_pix), dtype=np.int32)
            counts[:, recorded] = fr.sample_photons(lam, rng)
            expected[first:last] = lam.sum(1)
            photons[first:last] = counts.sum(1)
            writer.append(SparsePhotons.from_dense(counts))
    write_detector(det, out / "detector.h5")
    apparent = extra.get("apparent_scale", 1.0)
    attrs = {"label_names": json.dumps(LABEL_NAMES), "source": spec["source"],
             "q_per_voxel_inv_nm": extra["q_per_voxel_inv_nm"], "grid_size": volumes[0].shape[0],
             "grid_centre": volumes[0].shape[0] // 2, "seed": spec["seed"],
             "mean_photons": spec["mean_photons"], "intensity_scale": scale,
             "params": json.dumps({k: v for k, v in spec.items()}, sort_keys=True),
             "quaternion_convention": "scalar-first (w, x, y, z); frame d samples I(R_d q_t)"}
    attrs.update({k: v for k, v in extra.items() if k != "q_per_voxel_inv_nm"})
    truth_frames = {"label": label, "t": t, "quaternion": quats, "scale": fluence,
                    "size": sizes, "shape_index": shape_index, "photons": photons,
                    "expected_photons": expected}
    volume_info = {"label": labels, "t": np.array([s["t"] for s in shapes]),
                   "particle_volume_nm3": np.array([s["volume"] for s in shapes]) * apparent ** 3,
                   "exponent": np.full(len(shapes), np.nan)}
    write_truth(out / "truth.h5", truth_frames, volumes, volume_info, attrs)
    info = {"name": name, "spec": spec, "q_per_pixel": extra["q_per_voxel_inv_nm"],
            "num_pix": int(det.num_pix), "detector_side": int(round(math.sqrt(det.num_pix))),
            "photons_per_frame_mean": float(photons.mean()),
            "populations": {LABEL_NAMES[i]: int((label == i).sum()) for i in np.unique(label)},
            "seconds": time.perf_counter() - start}
    (out / "dataset.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def make_spiscape_dataset(name: str, spec: dict, out: Path) -> dict:
    from spiscape.simulate import simulate_dataset

    params = {k: v for k, v in spec.items() if k != "source"}
    start = time.perf_counter()
    summary = simulate_dataset(params, out)
    with h5py.File(out / "truth.h5", "r") as f:
        dq = float(f.attrs["q_per_voxel_inv_nm"])
    info = {"name": name, "spec": spec, "q_per_pixel": dq, "num_pix": summary["num_pix"],
            "detector_side": summary["detector_side"],
            "photons_per_frame_mean": summary["photons_per_frame_mean"],
            "populations": summary["populations"], "seconds": time.perf_counter() - start}
    (out / "dataset.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def make_dataset(name: str, out_root: Path, force: bool = False) -> dict:
    out = out_root / name
    if (out / "dataset.json").exists() and not force:
        return json.loads((out / "dataset.json").read_text())
    spec = DATASETS[name]
    log.info("%s: %s simulator, %d frames", name, spec["source"], spec["num_frames"])
    make = make_dragonfly_dataset if spec["source"] == "dragonfly" else make_spiscape_dataset
    info = make(name, spec, out)
    log.info("%s: done in %.0f s, %.0f photons/frame, %s", name, info["seconds"],
             info["photons_per_frame_mean"], info["populations"])
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "bench/data/validation"))
    p.add_argument("--only", nargs="+", choices=sorted(DATASETS), default=None)
    p.add_argument("--force", action="store_true", help="remake datasets that exist")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in args.only or DATASETS:
        make_dataset(name, Path(args.out), args.force)


if __name__ == "__main__":
    main()
