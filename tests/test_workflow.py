"""The Snakemake workflow: lint, the DAG it plans, and a tiny end-to-end run on two datasets."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import h5py
import numpy as np
import yaml

from spiscape.io.emc3d import read_emc3d
from tests.conftest import REPO, venv_executable


def no_slurm_controller() -> str:
    """A folder holding an ``scontrol`` that fails at once. The SLURM executor plugin (a dev
    dependency) runs ``scontrol show config`` when Snakemake starts; where SLURM's client is
    installed but no controller answers (a machine that ran ``make test-slurm`` once), that
    call waits 9 s, at every Snakemake start of every test. Tests that do not use SLURM put
    this folder first on their PATH; the SLURM tests pass ``real_slurm=True``."""
    folder = Path(tempfile.gettempdir()) / f"spiscape-no-slurm-{os.getuid()}"
    stub = folder / "scontrol"
    if not stub.exists():
        folder.mkdir(exist_ok=True)
        partial = folder / f"scontrol.{os.getpid()}"
        partial.write_text("#!/bin/sh\nexit 1\n")
        partial.chmod(0o755)
        partial.replace(stub)  # atomic: parallel workers never see half a script
    return str(folder)


def without_slurm_controller(env) -> dict:
    """``env`` (default this process's) with :func:`no_slurm_controller` first on its PATH."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = f"{no_slurm_controller()}{os.pathsep}{env.get('PATH', '')}"
    return env


def snakemake(workdir, *args, env=None, check=True, real_slurm=False):
    cmd = [venv_executable("snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir)]
    env = dict(os.environ if env is None else env) if real_slurm else \
        without_slurm_controller(env)
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


#: EMC small enough for a test: two replicates, a few classes, rotations and iterations
TINY_EMC = {"replicates": 2, "options": {"num_classes": 6, "num_rot": 8, "iterations": 4},
            "min_frames": 1}


#: and a VAE and phasing that only prove the wiring (the volumes phased: those refined from the
#: frames, the path off by default)
TINY_3D = {"vae": {"options": {"epochs": 2, "volume_size": 15, "num_volumes": 2,
                               "volumes_from": "frames"}},
           "phase": {"options": {"recipe": "10 ER", "starts": 1}}}


def write_config(path, datasets, **extra):
    path.write_text(yaml.safe_dump({"datasets": datasets, "classify2d": TINY_EMC, **TINY_3D,
                                    **extra}))
    return path


def planned_jobs(proc) -> dict[str, int]:
    """Job counts from the 'Job stats' table of a dry run."""
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Job stats"))
    counts = {}
    for line in lines[start + 3 :]:
        words = line.split()
        if len(words) != 2 or not words[1].isdigit():
            break
        counts[words[0]] = int(words[1])
    return counts


def test_lint_is_clean(env_with_venv_path):
    proc = subprocess.run(
        [venv_executable("snakemake"), "--lint"], cwd=REPO, capture_output=True, text=True,
        env=without_slurm_controller(env_with_venv_path), timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "good condition" in proc.stdout + proc.stderr


def test_default_config_plans_the_pipeline(tmp_path):
    """The embedded default: simulate, check, two EMC replicates, averages, common lines,
    embedding, orientation, VAE, phasing, landscape (with the VAE's frame latents)."""
    proc = snakemake(tmp_path, "--configfile", str(REPO / "config/config.yaml"), "-n")
    assert planned_jobs(proc) == {
        "simulate": 1, "inspect": 1, "classify2d": 2, "averages": 1, "commonlines_tile": 2,
        "commonlines_merge": 1, "embed": 1, "landscape": 1, "orient": 1, "vae": 1, "phase": 1,
        "summary": 1, "all": 1, "total": 15,
    }


def test_measured_dataset_needs_no_simulation(tmp_path):
    config = write_config(
        tmp_path / "c.yaml",
        {"run7": {"photons": ["a.emc", "b.emc"], "detector": "det.dat"},
         "sim": {"simulate": {"num_frames": 10}}},
    )
    for name in ("a.emc", "b.emc", "det.dat"):
        (tmp_path / name).write_text("x")
    proc = snakemake(tmp_path, "--configfile", str(config), "-n")
    assert planned_jobs(proc)["simulate"] == 1
    assert planned_jobs(proc)["inspect"] == 2
    assert planned_jobs(proc)["classify2d"] == 4  # two replicates per dataset
    assert "--photons a.emc b.emc --detector det.dat" in proc.stdout


def test_three_datasets_end_to_end_and_partial_reruns(tmp_path, env_with_venv_path):
    """Three datasets on the default profile: two simulated (one with its own EMC settings) and a
    'measured' one given as Dragonfly files; then what a change of parameters reruns."""
    datasets = {
        "sim": {"simulate": {"num_frames": 60, "seed": 3, "mean_photons": 300},
                # the amortised branch (off by default), warm-started from sim's VAE
                "amortise": {"run": True, "options": {"epochs": 2}}},
        "sim2": {"simulate": {"num_frames": 50, "seed": 4, "mean_photons": 300},
                 "classify2d": {"options": {"num_classes": 5}}, "vae": {"run": False},
                 # the 3D EMC branch (off by default), seeded from the landscape's clusters
                 # (--refine-cubic on, as by default, at a tiny num_div)
                 "emc3d": {"run": True, "options": {"num_div": 1, "iterations": 3,
                                                    "refine_num_div": 2,
                                                    "refine_iterations": 3}}},
        "measured": {"photons": "results/sim/data/photons.h5",
                     "detector": "results/sim/data/detector.h5"},
        # facility-wide reprocessing: these frames placed on sim's landscape, no EMC of their own
        "placed": {"photons": "results/sim/data/photons.h5",
                   "detector": "results/sim/data/detector.h5", "reference": "sim"},
    }
    config = write_config(tmp_path / "c.yaml", datasets)
    snakemake(tmp_path, "--configfile", str(config), "--cores", "2", env=env_with_venv_path)
    summary = json.loads((tmp_path / "results/sim/inspect/summary.json").read_text())
    assert summary["num_frames"] == 60
    assert sum(summary["populations"].values()) == 60
    assert 150 < summary["photons_per_frame_mean"] < 600
    for name in ("powder.png", "photons_per_frame.png", "radial_profile.png"):
        assert (tmp_path / "results/sim/inspect" / name).stat().st_size > 1000
    with h5py.File(tmp_path / "results/sim/averages.h5") as f:
        assert f["intens"].shape[0] >= 2 and set(f["replicate"][:]) == {0, 1}
    with h5py.File(tmp_path / "results/sim2/classify2d/rep0.h5") as f:
        assert f["intens"].shape[0] == 5  # the dataset's own override
    for name in ("convergence.png", "averages.png"):
        assert (tmp_path / "results/sim/classify2d" / name).stat().st_size > 1000
    with h5py.File(tmp_path / "results/sim/commonlines.h5") as f:
        cc = f["cc"][:]
        np.testing.assert_array_equal(cc, cc.T)
        np.testing.assert_array_equal(np.diag(cc), 1.0)
    with h5py.File(tmp_path / "results/sim/frames.h5") as f:
        assert f["clpca"].shape[0] == 60 and f["label"].shape == (60,)
        assert np.isfinite(f["latent"][:, 0]).any()  # the VAE's per-frame latents
    with h5py.File(tmp_path / "results/sim/vae/frame_latent.h5") as f:  # each frame's own
        assert f.attrs["method"] == "posterior" and f["latent_sd"].shape == f["latent"].shape
        assert f.attrs["size_steps"] == 9 and f.attrs["size_range"] == 0.08
        size, latent = f["size"][:, 0], f["latent"][:, 0]  # each frame's size factor
        assert np.array_equal(np.isfinite(size), np.isfinite(latent))
        assert np.all((size[np.isfinite(size)] > 0.91) & (size[np.isfinite(size)] < 1.09))
    assert (tmp_path / "results/sim/vae/figures/frame_sizes.png").stat().st_size > 1000
    with h5py.File(tmp_path / "results/sim/vae/volumes.h5") as f:  # what phasing reads
        assert "refined from the frames" in f.attrs["source"]
    with h5py.File(tmp_path / "results/sim2/frames.h5") as f:
        assert np.isnan(f["latent"][()]).all()  # vae: run: false
    assert not (tmp_path / "results/sim2/vae").exists()
    emc3d = read_emc3d(tmp_path / "results/sim2/emc3d/emc3d.h5", volumes=False)
    assert emc3d.frames["model"].shape == (50,) and len(emc3d.occupancy) >= 1
    with h5py.File(tmp_path / "results/sim2/emc3d/emc3d.h5") as f:  # the cubic check ran
        assert f["anisotropic_share_m3m"].shape == emc3d.occupancy.shape
    assert not (tmp_path / "results/sim2/emc3d/emc3d.unrefined.h5").exists()
    assert (tmp_path / "results/sim2/emc3d/phasing.h5").exists()
    assert sorted(p.name for p in (tmp_path / "results/sim2/emc3d/maps").glob("*.mrc"))
    assert not (tmp_path / "results/sim/emc3d").exists()  # off by default
    with h5py.File(tmp_path / "results/sim/amortise/amortise.h5") as f:
        assert f["quaternion"].shape == (60, 4) and np.isfinite(f["z"][()]).all()
    assert not (tmp_path / "results/sim2/amortise").exists()  # off by default
    assert (tmp_path / "results/sim/volume_curve.csv").read_text().startswith("index,z0")
    maps = sorted(p.name for p in (tmp_path / "results/sim/maps").glob("[!.]*"))
    assert maps == ["density_000.mrc", "density_001.mrc", "z_values.txt"]
    assert (tmp_path / "results/sim/vae/volumes/intensity_000.mrc").exists()
    metrics = json.loads((tmp_path / "results/sim/landscape_metrics.json").read_text())
    assert metrics["frames_total"] == 60
    measured = json.loads((tmp_path / "results/measured/inspect/summary.json").read_text())
    assert measured["num_frames"] == 60 and "populations" not in measured
    assert measured["photons_total"] == summary["photons_total"]
    index = (tmp_path / "results/summary.tsv").read_text().splitlines()
    assert index[0].startswith("dataset\tframes") and len(index) == 5
    assert {line.split("\t")[0] for line in index[1:]} == set(datasets)
    assert not (tmp_path / "results/placed/classify2d").exists()
    rows = {row["dataset"]: row for row in json.loads(
        (tmp_path / "results/summary.json").read_text())}
    assert rows["placed"]["landscape"] == "placed on sim" and rows["sim"]["landscape"] == "own"
    assert rows["placed"]["cluster_fractions"] and rows["sim"]["cluster_fractions"]
    # sim's own frames: flagged as often as the calibration quantile says (1 of 60), no more
    assert rows["placed"]["outliers"] <= 0.05 and rows["sim"]["outliers"] is None

    # a stage's parameters rerun that stage and what follows, nothing upstream
    changed = write_config(tmp_path / "c2.yaml", datasets,
                           embed={"options": {"components": 2}})
    plan = planned_jobs(snakemake(tmp_path, "--configfile", str(changed), "-n"))
    assert plan == {"embed": 3, "vae": 1, "phase": 1, "landscape": 3, "place": 1, "summary": 1,
                    "emc3d": 1, "emc3d_phase": 1, "amortise": 1, "all": 1, "total": 14}
    one = {**datasets, "sim2": {**datasets["sim2"], "commonlines": {"num_tiles": 3}}}
    changed = write_config(tmp_path / "c3.yaml", one)
    plan = planned_jobs(snakemake(tmp_path, "--configfile", str(changed), "-n"))
    assert plan == {"commonlines_tile": 3, "commonlines_merge": 1, "embed": 1, "landscape": 1,
                    "summary": 1, "emc3d": 1, "emc3d_phase": 1, "all": 1, "total": 10}
    plan = planned_jobs(snakemake(tmp_path, "--configfile", str(config), "-n",
                                  "--forcerun", "averages", "--until", "averages"))
    assert plan == {"averages": 3, "total": 3}

    report = tmp_path / "report.html"
    snakemake(
        tmp_path, "--configfile", str(config), "--report", str(report), env=env_with_venv_path
    )
    assert report.stat().st_size > 10_000
    html = report.read_text(errors="replace")
    # captions render without Docutils errors, in pipeline order, with the VAE and the table
    assert "System Message" not in html and "Docutils" not in html
    for name in ("1. Dataset", "2. EMC 2D classification", "6. 3D: VAE and phasing",
                 "VAE convergence", "VAE latent_vs_t", "volume along the latent",
                 "7. 3D EMC", "3D EMC models", "8. Amortised inference",
                 "amortised: pose distribution"):
        assert name in html, name


def test_detector_that_does_not_match_fails_cleanly(tmp_path, env_with_venv_path):
    """Photons from one detector with another detector: one clear line, no finished output."""
    from spiscape.io import Detector, SparsePhotons, write_detector, write_photons

    rng = np.random.default_rng(0)
    write_photons(SparsePhotons.from_dense(rng.poisson(0.2, (5, 30))), tmp_path / "p.h5")
    n = 20
    write_detector(
        Detector(qx=np.arange(n, dtype=float), qy=np.zeros(n), qz=np.zeros(n), corr=np.ones(n),
                 mask=np.zeros(n, np.uint8), detd=100.0, ewald_rad=100.0),
        tmp_path / "d.h5",
    )
    config = write_config(tmp_path / "c.yaml", {"bad": {"photons": "p.h5", "detector": "d.h5"}})
    proc = snakemake(tmp_path, "--configfile", str(config), "--cores", "1", check=False,
                     env=env_with_venv_path)
    assert proc.returncode != 0
    # whichever job reads the photons first fails: its log ends with the one-line error
    logs = [p.read_text().strip().splitlines() for p in (tmp_path / "results/logs/bad").glob("*")]
    failed = [lines[-1] for lines in logs if lines and "error:" in lines[-1]]
    assert failed, logs
    for line in failed:
        assert line.startswith("spiscape ") and "p.h5" in line and "num_pix" in line
    assert not list((tmp_path / "results/bad").rglob("*.json"))
    assert not list((tmp_path / "results/bad").rglob("*.h5"))


def test_rules_find_spiscape_without_an_activated_environment(tmp_path, env_with_venv_path):
    """`.venv/bin/snakemake ...` with a PATH that lacks the venv: the jobs still find the
    spiscape beside that snakemake, and the command line (a rule parameter) is the same as from
    an activated environment, so nothing reruns between the two."""
    import os

    config = write_config(tmp_path / "c.yaml", {"sim": {"simulate": {"num_frames": 10}}})
    plain = {**os.environ, "PATH": "/usr/bin:/bin"}
    snakemake(tmp_path, "--configfile", str(config), "--cores", "1", "--until", "simulate",
              env=plain)
    assert (tmp_path / "results/sim/data/photons.h5").exists()
    plan = planned_jobs(snakemake(tmp_path, "--configfile", str(config), "-n", "--until",
                                  "simulate", env=env_with_venv_path))
    assert plan == {"total": 0}


def test_report_captions_render_without_docutils_messages():
    import re

    from docutils.core import publish_parts

    for path in sorted((REPO / "workflow/report").glob("*.rst")):
        text = re.sub(r"\{\{[^}]*\}\}", "demo", path.read_text())
        html = publish_parts(text, writer_name="html",
                             settings_overrides={"report_level": 1, "halt_level": 5})["body"]
        assert "system-message" not in html, (path.name, html)
