"""Dragonfly's EMC in 2D classification mode, run as an external program for benchmarks.

Dragonfly (Ayyer, Lan, Elser & Loh, J. Appl. Cryst. 49, 1320 (2016); PyPI ``dragonfly-spi``, C +
Cython with MPI and OpenMP, GPL-3.0) is the reference EMC code. It is NEVER a dependency of
spiscape and none of its code is here: it lives in its own virtual environment (see
``install_hint()``) and this module only writes its ``config.ini``, starts its ``dragonfly.emc``
console script with ``subprocess`` and reads the files it writes (plain text log, HDF5 output).

    python bench/dragonfly_baseline.py PHOTONS.h5 DETECTOR.h5 --modes 10 --num-rot 24 \\
        --iterations 10 --threads 2
    python bench/dragonfly_baseline.py --install-hint

How Dragonfly 0.1.0 (``recon_type = 2d``) behaves, read from its source and checked by running it:

Grid. Each pixel's 3D ``(qx, qy, qz)`` (voxel units) is projected back onto the flat detector:
``c = (qx, qy) * detd / (ewald_rad + qz)`` when ``mean(qz) <= 0`` (the usual sign), or
``detd / (ewald_rad - qz)`` when ``mean(qz) > 0``; qz is then set to 0. The model is ``num_modes``
square S×S images with ``S = 2 * ceil(qmax) + 3`` where ``qmax = max |c|`` over ALL pixels, bad
ones (mask 2) included, and the beam sits at voxel ``S // 2`` (= (S-1)/2, S is odd). There is no
config key for S. spiscape's default grid takes qmax over mask < 2 pixels only, so on detectors
with bad corners Dragonfly's S is larger (demo detector: 83 against 61); ``run_emc2d(size=...)``
can make Dragonfly use the smaller grid by handing it a copy of the detector whose bad pixels have
``qx = qy = 0`` (they are never used by Dragonfly: the likelihood reads mask 0 pixels only, the
merge mask < 2), which changes nothing else.

Views and rotations. The view of mode m at rotation r is the model bilinearly interpolated at
``(i, j) = S//2 + R(θ_r) c`` with ``R = [[cos, -sin], [sin, cos]]`` (i indexes the first axis of
``intens[m]``, from qx), times ``corr / mean(corr)`` (corr normalised over all pixels). Angles are
``np.arange(0, 2π/g, 2π/g/num_rot)`` with g = 1, or g = 2 when ``friedel_sym = 1`` (then also every
model is Friedel-symmetrised after each M-step). Quirk: for some num_rot (61, 122, 197, 244, 343,
...) that float arange has num_rot + 1 elements and Dragonfly stops with "could not broadcast input
array"; ``run_emc2d`` refuses those values up front (``dragonfly_num_rot_ok``). Every (rotation,
mode) pair has the prior 1/num_rot (no mode prior, no occupancy update). ``orientations`` in the
output is ``rotation * num_modes + mode``.

Likelihood and scaling. With K_dt the photons of frame d in mask 0 pixels, W_rt the view and u_r =
Σ_t W_rt, log P_dr ∝ β_d (log(1/num_rot) − φ u_r + Σ_t K_dt log W_rt), where φ is the per-iteration
``rescale`` = mean photons per frame / mean_r u_r (printed on stderr), or, with
``need_scaling = 1`` from the second iteration on, the frame's own scale φ_d, updated after each
E-step as φ_d = K_d / Σ_r P_dr u_r rescale (scales start at 1 and are NOT renormalised to mean 1 in
2D; only 3D renormalises). M-step: tomogram W_rt = Σ_d P_dr K_dt / Σ_d P_dr φ_d (φ_d = 1 without
scaling and in iteration 1), divided by corr and merged bilinearly; model = merged / interpolation
weight where weight > 0, else 0. No other normalisation of the models (and Σ_t K_dt log φ is left
out of the logged likelihood). Pixels with mask 1 are merged but not used in the likelihood; mask 2
pixels are ignored.

β. ``beta = auto`` (default): with scaling each frame gets β_d = exp(−6.5 (K_d·1e−5)^0.15), without
it one β from the mean count; ``beta = x`` sets every frame to x. Iteration i uses
``min(1, β_d · beta_factor · beta_jump ** ((i − 1) // beta_period))``
(``beta_schedule = jump period``).

Initial models. Uniform random in [0, 2 · mean photons per frame / number of mask-0 pixels), drawn
with ``np.random.random`` unseeded, or seeded with 0x5EED when ``fixed_seed = 1``; Dragonfly takes
no other seed. ``run_emc2d(seed=int)`` therefore draws the same distribution itself
(``np.random.default_rng(seed)``) and passes it as ``start_model_file``; ``seed=None`` uses
Dragonfly's ``fixed_seed``. Dragonfly writes it to ``data/output_000.h5``.

Outputs. ``EMC.log`` (tab separated, one line per iteration): ``Iter, time`` (seconds of the whole
iteration: E-step, M-step, model update and writing its output file; 2 decimals), ``rms_change``
(RMS over all voxels of new − old model), ``info_rate`` (mean over frames of Σ_r P log(P · num_rot
· num_modes), nats), ``log-likelihood`` (mean over frames of Σ_r P_dr (log P_dr unnormalised − Σ
log K!)), ``num_rot`` (rotations per mode) and ``beta`` (mean β); its header has num_data,
mean_count, num_pix (good/total), system_volume (M × S × S), threads, processes, alpha, β of frame
0, need_scaling. ``data/output_NNN.h5`` per iteration: ``intens`` (M, S, S), ``inter_weight``,
``occupancies`` (frames, M), ``orientations``, ``scale``, ``likelihood``, ``mutual_info`` (per
frame), ``quaternions`` (num_rot, 5: angle, 0, 0, 0, weight) and ``params/*``. With
``verbosity = 2`` stderr carries the seconds of each stage (alloc, rescale, prob, norm, update,
sync, scale) of each iteration."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np

DEFAULT_VENV = "/opt/dragonfly-venv"
ENTRY_POINT = "dragonfly.emc"
STAGES = ("alloc", "rescale", "prob", "norm", "update", "sync", "scale")


def install_hint(venv: str = DEFAULT_VENV) -> str:
    """The commands that build Dragonfly's own environment on Debian 12 (bookworm), as root."""
    return f"""\
# Dragonfly baseline (GPL): its own venv, outside the repository, never a spiscape dependency.
apt-get update
apt-get install -y build-essential libgsl-dev libhdf5-dev libopenmpi-dev
#   libhdf5-dev pulls in hdf5-helpers (h5cc) and libopenmpi-dev pulls in openmpi-bin (mpicc,
#   mpirun): Dragonfly's setup.py asks `h5cc -shlib -show`, `mpicc --showme` and `gsl-config`
#   for its flags, so no CFLAGS are needed. Without h5cc, set
#   CFLAGS=-I/usr/include/hdf5/serial LDFLAGS=-L/usr/lib/x86_64-linux-gnu/hdf5/serial
python3.11 -m venv {venv}
{venv}/bin/pip install -U pip
{venv}/bin/pip install dragonfly-spi==0.1.0 mpi4py
#   dragonfly-spi builds from its sdist (about 2 minutes on 2 cores). It does not declare mpi4py,
#   but dragonfly.emc imports it: without it the run stops at "No module named 'mpi4py'".
{venv}/bin/dragonfly.emc --help"""


def find_dragonfly(venv: str | os.PathLike | None = DEFAULT_VENV) -> str | None:
    """Path of Dragonfly's ``dragonfly.emc`` entry point, or None when it is not installed.

    Looks in ``$DRAGONFLY_EMC``, then ``venv/bin``, then on PATH.
    """
    candidates = []
    if os.environ.get("DRAGONFLY_EMC"):
        candidates.append(Path(os.environ["DRAGONFLY_EMC"]))
    if venv:
        candidates.append(Path(venv) / "bin" / ENTRY_POINT)
    found = shutil.which(ENTRY_POINT)
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


# --------------------------------------------------------------------------- geometry and data


def dragonfly_coords_2d(qx, qy, qz, detd: float, ewald_rad: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat-detector pixel coordinates as Dragonfly's 2D mode computes them (beam at 0)."""
    qx, qy, qz = (np.asarray(a, dtype=np.float64) for a in (qx, qy, qz))
    denom = ewald_rad - qz if qz.mean() > 0 else ewald_rad + qz
    return qx * detd / denom, qy * detd / denom


def dragonfly_num_rot_ok(num_rot: int, friedel: bool = False) -> bool:
    """Whether Dragonfly's in-plane angle table (a float np.arange) has exactly num_rot entries."""
    span = 2 * np.pi / (2 if friedel else 1)
    return num_rot >= 1 and len(np.arange(0, span, span / num_rot)) == num_rot


def dragonfly_grid(detector: str | os.PathLike) -> dict:
    """Dragonfly's 2D grid for a detector file: S over all pixels, and over mask < 2 pixels."""
    with h5py.File(detector, "r") as f:
        cx, cy = dragonfly_coords_2d(f["qx"][:], f["qy"][:], f["qz"][:],
                                     float(f["detd"][()]), float(f["ewald_rad"][()]))
        mask = f["mask"][:].ravel()
    radius = np.hypot(cx, cy)
    size_all = 2 * math.ceil(float(radius.max())) + 3
    keep = mask < 2
    size_good = 2 * math.ceil(float(radius[keep].max())) + 3 if keep.any() else size_all
    return {"size": size_all, "center": size_all // 2, "size_without_bad_pixels": size_good,
            "num_pix": int(mask.size), "num_pix_good": int((mask == 0).sum()),
            "num_pix_by_mask": {int(v): int((mask == v).sum()) for v in np.unique(mask)}}


def photon_stats(photons: str | os.PathLike, detector: str | os.PathLike) -> dict:
    """Frames and photons per frame (all pixels, and mask 0 pixels as Dragonfly counts them)."""
    with h5py.File(detector, "r") as f:
        good = f["mask"][:].ravel() == 0
    with h5py.File(photons, "r") as f:
        place_ones, place_multi = f["place_ones"][:], f["place_multi"][:]
        count_multi = f["count_multi"][:]
        num_pix = int(np.ravel(f["num_pix"][()])[0])
    total = np.empty(len(place_ones))
    counted = np.empty(len(place_ones))
    for d, (po, pm, cm) in enumerate(zip(place_ones, place_multi, count_multi, strict=True)):
        total[d] = len(po) + cm.sum()
        counted[d] = good[po].sum() + cm[good[pm]].sum()
    return {"frames": len(total), "num_pix": num_pix,
            "photons_per_frame": float(total.mean()) if len(total) else 0.0,
            "photons_per_frame_mask0": float(counted.mean()) if len(total) else 0.0,
            "num_pix_mask0": int(good.sum())}


def _trimmed_detector(detector: Path, out: Path) -> Path:
    """Copy of the detector with qx = qy = 0 on bad (mask 2) pixels: Dragonfly's S ignores them."""
    with h5py.File(detector, "r") as src, h5py.File(out, "w") as dst:
        for key in src:
            src.copy(key, dst)
        bad = src["mask"][:].ravel() == 2
        for key in ("qx", "qy"):
            q = src[key][:].astype(np.float64)
            q.ravel()[bad] = 0.0
            del dst[key]
            dst[key] = q
    return out


# --------------------------------------------------------------------------- config and logs


def write_config(path: Path, params: dict) -> None:
    lines = ["# written by spiscape bench/dragonfly_baseline.py", "[emc]"]
    lines += [f"{k} = {v}" for k, v in params.items()]
    path.write_text("\n".join(lines) + "\n")


_ROW = re.compile(r"^(\d+)\t")


def parse_log(path: str | os.PathLike) -> dict:
    """Dragonfly's EMC.log: header values and one dict per iteration."""
    header: dict = {}
    rows = []
    for line in Path(path).read_text().splitlines():
        if _ROW.match(line):
            f = line.split()
            rows.append({"iteration": int(f[0]), "seconds": float(f[1]), "rms_change": float(f[2]),
                         "info_rate": float(f[3]), "log_likelihood": float(f[4]),
                         "num_rot": int(f[5]), "beta": float(f[6])})
        elif "=" in line:
            key, _, value = (s.strip() for s in line.partition("="))
            header[key] = value
    if "num_pix" in header and "/" in header["num_pix"]:
        good, total = header["num_pix"].split("/")
        header["num_pix_good"], header["num_pix"] = int(good), int(total)
    for key in ("num_data", "num_rot", "num_threads", "num_proc"):
        if key in header and str(header[key]).isdigit():
            header[key] = int(header[key])
    for key in ("mean_count", "alpha", "beta"):
        if key in header:
            try:
                header[key] = float(header[key])
            except ValueError:
                pass
    return {"header": header, "iterations": rows}


def parse_stage_times(stderr: str) -> list[dict]:
    """Per-iteration stage seconds from Dragonfly's stderr (``verbosity >= 2``)."""
    out: list[dict] = []
    for line in stderr.splitlines():
        parts = line.strip().split(None, 2)
        if len(parts) < 2 or parts[0] not in STAGES:
            continue
        try:
            secs = float(parts[1])
        except ValueError:
            continue
        if parts[0] == "alloc" or not out:
            out.append({})
        out[-1][parts[0]] = secs
        if parts[0] == "rescale" and len(parts) == 3:
            m = re.search(r"\(=\s*([-+0-9.eE]+)", parts[2])
            if m:
                out[-1]["rescale_factor"] = float(m.group(1))
    return out


# --------------------------------------------------------------------------- runner


def run_emc2d(
    photons: str | os.PathLike,
    detector: str | os.PathLike,
    workdir: str | os.PathLike,
    num_modes: int,
    num_rot: int,
    size: int | None,
    iterations: int,
    threads: int = 2,
    beta_start: float | None = None,
    beta_jump: float | None = None,
    beta_period: int | None = None,
    need_scaling: bool = True,
    friedel: bool = False,
    seed: int | None = 1,
    *,
    mpi_procs: int = 1,
    venv: str | os.PathLike | None = DEFAULT_VENV,
    strict_size: bool = False,
    timeout: float | None = None,
) -> dict:
    """Run Dragonfly's EMC in 2D mode on Dragonfly-format files and collect its timings and models.

    ``size`` is the S×S grid wanted: None or Dragonfly's own S runs as is; S computed without the
    bad pixels runs on a trimmed detector copy (see the module docstring); any other value cannot
    be given to Dragonfly, so it warns (or raises with ``strict_size``) and runs with its own S.
    ``beta_start`` None means Dragonfly's per-frame automatic β; ``beta_jump``/``beta_period`` None
    mean no change (jump 1, period 100). ``seed`` int: start models drawn here with that seed;
    None: Dragonfly's fixed seed. ``mpi_procs`` > 1 runs under ``mpirun``.

    Returns a dict whose every entry but ``intens`` is JSON friendly: ``seconds_per_iteration``
    (Dragonfly's own per-iteration time from its log, 10 ms resolution),
    ``wall_seconds_per_iteration`` (from each iteration's "beta factor" line to its "Finished
    iteration" line on stdout), ``total_seconds`` (whole
    process: start-up and data loading included), ``intens`` (M, S, S) final models, ``log``
    (header + per-iteration rows), ``stage_seconds``, ``command``, ``config``, ``grid``, ``data``,
    ``output`` (path of the last ``output_NNN.h5``).
    """
    if not dragonfly_num_rot_ok(num_rot, friedel):
        raise ValueError(f"Dragonfly 0.1.0 crashes with num_rot = {num_rot}"
                         f"{' and Friedel symmetry' if friedel else ''}: np.arange gives it "
                         f"{num_rot + 1} angles; pick another num_rot")
    exe = find_dragonfly(venv)
    if exe is None:
        raise RuntimeError("Dragonfly is not installed; build its environment with:\n"
                           + install_hint())
    photons, detector = Path(photons).resolve(), Path(detector).resolve()
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for old in list(work.glob("data/output_*.h5")) + [work / "EMC.log"]:
        old.unlink(missing_ok=True)

    grid = dragonfly_grid(detector)
    det_used = detector
    grid["size_requested"] = size
    if size is not None and size != grid["size"]:
        if size == grid["size_without_bad_pixels"]:
            det_used = _trimmed_detector(detector, work / "detector_no_bad_q.h5")
            grid["trimmed_bad_pixels"] = True
            grid["size"], grid["center"] = size, size // 2
        else:
            msg = (f"Dragonfly cannot use a {size}x{size} grid for this detector: its 2D size is "
                   f"{grid['size']} (all pixels) or {grid['size_without_bad_pixels']} (bad pixels "
                   "trimmed)")
            if strict_size:
                raise ValueError(msg)
            print(f"warning: {msg}; running with {grid['size']}", file=sys.stderr)
    grid.setdefault("trimmed_bad_pixels", False)
    data = photon_stats(photons, det_used)

    config = {
        "in_photons_file": str(photons),
        "in_detector_file": str(det_used),
        "recon_type": "2d",
        "num_modes": int(num_modes),
        "num_rot": int(num_rot),
        "need_scaling": int(bool(need_scaling)),
        "friedel_sym": int(bool(friedel)),
        "beta": "auto" if beta_start is None else repr(float(beta_start)),
        "beta_schedule": f"{1.0 if beta_jump is None else float(beta_jump)!r} "
                         f"{100 if beta_period is None else int(beta_period)}",
        "alpha": 0.0,
        "output_folder": "data/",
        "log_file": "EMC.log",
        "verbosity": 2,
    }
    if seed is None:
        config["fixed_seed"] = 1
    else:
        size_used = grid["size"]
        model_mean = 2.0 * data["photons_per_frame_mask0"] / max(data["num_pix_mask0"], 1)
        start = np.random.default_rng(seed).random((num_modes, size_used, size_used)) * model_mean
        with h5py.File(work / "start_model.h5", "w") as f:
            f["intens"] = start
        config["start_model_file"] = "start_model.h5"

    run = _execute(exe, work, config, threads, iterations, mpi_procs, timeout)
    with h5py.File(run["output"], "r") as f:
        intens = f["intens"][:]
        num_rotations = int(f["quaternions"].shape[0])
    return {**run, "intens": intens, "grid": grid, "data": data, "num_modes": int(num_modes),
            "num_rot": int(num_rot), "num_rotations": num_rotations}


def _execute(exe: str, work: Path, config: dict, threads: int, iterations: int,
             mpi_procs: int = 1, timeout: float | None = None) -> dict:
    """Run Dragonfly's emc with ``config`` (written to work/config.ini) and collect its timings:
    ``seconds_per_iteration`` (its log, 10 ms resolution), ``wall_seconds_per_iteration``,
    ``total_seconds``, ``log``, ``stage_seconds``, ``command``, ``output`` (last output file)."""
    write_config(work / "config.ini", config)
    cmd = [exe, "-c", "config.ini", "-t", str(int(threads)), str(int(iterations))]
    if mpi_procs > 1:
        mpirun = shutil.which("mpirun") or "mpirun"
        extra = ["--allow-run-as-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        cmd = [mpirun, *extra, "--oversubscribe", "-np", str(int(mpi_procs)), *cmd]
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS=str(int(threads)), PYTHONUNBUFFERED="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")

    stamps: dict[int, float] = {}
    starts: list[float] = []
    stdout_lines: list[str] = []
    t0 = time.perf_counter()
    with open(work / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=err,
                                text=True, bufsize=1)
        timer = None
        if timeout:
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter()
            stdout_lines.append(line)
            if line.startswith("beta factor"):
                starts.append(now)
            m = re.match(r"Finished iteration (\d+)", line)
            if m:
                stamps[int(m.group(1))] = now
        rc = proc.wait()
        if timer is not None:
            timer.cancel()
    total = time.perf_counter() - t0
    (work / "stdout.txt").write_text("".join(stdout_lines))
    stderr = (work / "stderr.txt").read_text()
    command = " ".join(cmd)
    if rc != 0:
        tail = "\n".join((stderr + "".join(stdout_lines)).splitlines()[-20:])
        raise RuntimeError(f"Dragonfly failed (exit {rc}) in {work}: {command}\n{tail}")

    log = parse_log(work / "EMC.log")
    outputs = sorted((work / "data").glob("output_[0-9][0-9][0-9].h5"))
    iters = sorted(stamps)
    wall = []
    for k, it in enumerate(iters):
        begin = starts[k] if k < len(starts) else (stamps[iters[k - 1]] if k else t0)
        wall.append(stamps[it] - begin)
    return {
        "seconds_per_iteration": [r["seconds"] for r in log["iterations"]],
        "wall_seconds_per_iteration": wall,
        "total_seconds": total,
        "log": log,
        "stage_seconds": parse_stage_times(stderr),
        "command": f"cd {work} && OMP_NUM_THREADS={int(threads)} {command}",
        "config": config,
        "iterations": int(iterations),
        "threads": int(threads),
        "mpi_procs": int(mpi_procs),
        "workdir": str(work),
        "output": str(outputs[-1]),
    }


def run_emc3d(photons, detector, workdir, num_modes: int, num_div: int, iterations: int,
              threads: int = 2, beta_jump: float = 1.0, beta_period: int = 100,
              need_scaling: bool = True, start_models: np.ndarray | None = None, *,
              beta_start: float | None = None,
              venv: str | os.PathLike | None = DEFAULT_VENV, timeout: float | None = None
              ) -> dict:
    """Dragonfly's 3D (multi-mode) EMC: ``num_modes`` models, the refined 600-cell ``num_div``,
    Friedel symmetry, β from ``beta_start`` for every frame (None: its automatic per-frame β)
    times ``beta_jump`` every ``beta_period``;
    ``start_models`` (K, V, V, V) given as its start model file (else its own random start).
    Returns the timings of :func:`_execute`, ``intens`` (K, V, V, V), ``modes`` (each frame's
    most probable model), ``num_rotations``."""
    exe = find_dragonfly(venv)
    if exe is None:
        raise RuntimeError("Dragonfly is not installed; build its environment with:\n"
                           + install_hint())
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for old in list(work.glob("data/output_*.h5")) + [work / "EMC.log"]:
        old.unlink(missing_ok=True)
    config = {
        "in_photons_file": str(Path(photons).resolve()),
        "in_detector_file": str(Path(detector).resolve()),
        "recon_type": "3d", "num_modes": int(num_modes), "num_div": int(num_div),
        "need_scaling": int(bool(need_scaling)), "friedel_sym": 1,
        "beta": "auto" if beta_start is None else repr(float(beta_start)),
        "beta_schedule": f"{float(beta_jump)!r} {int(beta_period)}", "alpha": 0.0,
        "output_folder": "data/", "log_file": "EMC.log", "verbosity": 2,
    }
    if start_models is not None:
        with h5py.File(work / "start_model.h5", "w") as f:
            f["intens"] = np.asarray(start_models, dtype=np.float64)
        config["start_model_file"] = "start_model.h5"
    run = _execute(exe, work, config, threads, iterations)
    with h5py.File(run["output"], "r") as f:
        intens = f["intens"][:]
        modes = (f["occupancies"][:].argmax(axis=1) if "occupancies" in f
                 else np.zeros(f["scale"].shape[0], dtype=np.int64))
        num_rotations = int(f["quaternions"].shape[0])
    return {**run, "intens": intens, "modes": modes, "num_modes": int(num_modes),
            "num_div": int(num_div), "num_rotations": num_rotations}


# --------------------------------------------------------------------------- command line


def _table(res: dict) -> str:
    head = f"{'iter':>4} {'s (log)':>8} {'s (wall)':>8} {'rms_change':>11} {'info_rate':>9} " \
           f"{'log-likelihood':>14} {'beta':>8}"
    lines = [head, "-" * len(head)]
    wall = res["wall_seconds_per_iteration"]
    for k, r in enumerate(res["log"]["iterations"]):
        w = f"{wall[k]:8.3f}" if k < len(wall) else f"{'':8}"
        lines.append(f"{r['iteration']:4d} {r['seconds']:8.2f} {w} {r['rms_change']:11.4e} "
                     f"{r['info_rate']:9.4f} {r['log_likelihood']:14.6e} {r['beta']:8.5f}")
    secs = res["seconds_per_iteration"]
    later = secs[1:] if len(secs) > 1 else secs
    d, g = res["data"], res["grid"]
    lines += [
        "",
        f"frames {d['frames']}, pixels {d['num_pix']} ({d['num_pix_mask0']} with mask 0), "
        f"photons/frame {d['photons_per_frame']:.1f} "
        f"({d['photons_per_frame_mask0']:.1f} in mask 0)",
        f"modes {res['num_modes']}, rotations {res['num_rotations']}, grid {g['size']}x{g['size']}"
        f"{' (bad pixels trimmed)' if g['trimmed_bad_pixels'] else ''}, iterations "
        f"{res['iterations']}, threads {res['threads']}, MPI processes {res['mpi_procs']}",
        f"seconds/iteration (log): mean {np.mean(secs):.3f}, median after the first "
        f"{np.median(later):.3f}; wall mean {np.mean(res['wall_seconds_per_iteration']):.3f}; "
        f"whole run {res['total_seconds']:.2f} s",
        f"command: {res['command']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("photons", nargs="?")
    p.add_argument("detector", nargs="?")
    p.add_argument("--workdir", default=None, help="default: /tmp/dragonfly_2d_<pid>")
    p.add_argument("--modes", type=int, default=10)
    p.add_argument("--num-rot", type=int, default=24)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mpi", type=int, default=1, help="MPI processes (mpirun)")
    p.add_argument("--beta-start", type=float, default=None)
    p.add_argument("--beta-jump", type=float, default=None)
    p.add_argument("--beta-period", type=int, default=None)
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--friedel", action="store_true")
    p.add_argument("--seed", type=int, default=1, help="negative: Dragonfly's own fixed seed")
    p.add_argument("--venv", default=DEFAULT_VENV)
    p.add_argument("--json", default=None, help="write the result (without intens) here")
    p.add_argument("--install-hint", action="store_true")
    a = p.parse_args(argv)
    if a.install_hint:
        print(install_hint(a.venv))
        return 0
    if not (a.photons and a.detector):
        p.error("photons and detector files are required")
    if find_dragonfly(a.venv) is None:
        print("Dragonfly not found. Build its environment with:\n" + install_hint(a.venv),
              file=sys.stderr)
        return 2
    res = run_emc2d(
        a.photons, a.detector, a.workdir or f"/tmp/dragonfly_2d_{os.getpid()}",
        num_modes=a.modes, num_rot=a.num_rot, size=a.size, iterations=a.iterations,
        threads=a.threads, beta_start=a.beta_start, beta_jump=a.beta_jump,
        beta_period=a.beta_period, need_scaling=not a.no_scaling, friedel=a.friedel,
        seed=None if a.seed < 0 else a.seed, mpi_procs=a.mpi, venv=a.venv,
    )
    print(_table(res))
    if a.json:
        Path(a.json).write_text(json.dumps({k: v for k, v in res.items() if k != "intens"},
                                           indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
