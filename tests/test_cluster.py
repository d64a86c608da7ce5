"""Cluster operation planned in dry runs: the SLURM profile's launchers, run tables, batches."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO
from tests.test_workflow import planned_jobs, snakemake, write_config


@pytest.fixture
def run_files(tmp_path):
    for name in ("a.h5", "b.emc", "c.h5", "det.h5"):
        (tmp_path / name).write_text("x")
    return tmp_path


def dry_run(workdir, config, *extra):
    return snakemake(workdir, "--configfile", str(config), "-n", "-p", *extra)


def shell_lines(proc, command):
    return [line for line in proc.stdout.splitlines() if f"spiscape {command} " in line]


def test_slurm_profile_launches_mpi_ranks_per_gpu(run_files):
    config = write_config(run_files / "c.yaml", {"r1": {"photons": "a.h5", "detector": "det.h5"}})
    slurm = str(REPO / "profiles/slurm")
    proc = dry_run(run_files, config, "--profile", slurm, "--cores", "64")
    emc = shell_lines(proc, "classify2d")
    assert len(emc) == 2 and all(re.search(r"srun -n 4 spiscape classify2d", x) for x in emc)
    # one rank per GPU, and a GPU for each common-line tile
    resources = [x for x in proc.stdout.splitlines() if "resources:" in x]
    assert any("mpi=srun" in x and "tasks=4" in x and "gpu=4" in x and "tasks_per_gpu=1" in x
               for x in resources)
    assert sum(bool(re.search(r"(?<!_)gpu=1\b", x)) for x in resources) == 2  # two tiles
    assert "OMP_NUM_THREADS=4" in emc[0]


def test_default_profile_runs_emc_as_one_process(run_files):
    config = write_config(run_files / "c.yaml", {"r1": {"photons": "a.h5", "detector": "det.h5"}})
    emc = shell_lines(dry_run(run_files, config), "classify2d")
    assert emc and not any("srun" in x or "mpiexec" in x for x in emc)


def test_runs_from_a_table_with_overrides(run_files):
    (run_files / "runs.tsv").write_text(
        "name\tphotons\tdetector\tclassify2d.options.num_classes\tcommonlines.num_tiles\n"
        "r0042\ta.h5\tdet.h5\t7\t\n"
        "r0043\tb.emc;c.h5\tdet.h5\t\t3\n"
    )
    config = write_config(run_files / "c.yaml", {"sim": {"simulate": {"num_frames": 10}}},
                          datasets_table=str(run_files / "runs.tsv"))
    proc = dry_run(run_files, config)
    jobs = planned_jobs(proc)
    assert jobs["inspect"] == 3 and jobs["classify2d"] == 6 and jobs["summary"] == 1
    assert jobs["commonlines_tile"] == 2 + 2 + 3
    emc = shell_lines(proc, "classify2d")
    assert sum("--num-classes 7" in x for x in emc) == 2
    assert any("--photons b.emc c.h5" in x for x in emc)


def test_a_run_listed_twice_is_refused(run_files):
    (run_files / "runs.tsv").write_text(
        "name,photons,detector\nr1,a.h5,det.h5\nr1,c.h5,det.h5\n"
    )
    config = write_config(run_files / "c.yaml", {}, datasets_table=str(run_files / "runs.tsv"))
    proc = snakemake(run_files, "--configfile", str(config), "-n", check=False)
    assert proc.returncode != 0 and "listed twice" in proc.stdout + proc.stderr


def test_batches_split_the_runs(run_files):
    datasets = {f"r{i}": {"photons": "a.h5", "detector": "det.h5"} for i in range(4)}
    config = write_config(run_files / "c.yaml", datasets)
    proc = dry_run(run_files, config, "--batch", "all=1/2")
    assert planned_jobs(proc)["inspect"] < 4


def test_slurm_profile_runs_the_vae_with_torchrun_per_gpu(run_files):
    config = write_config(run_files / "c.yaml", {"sim": {"simulate": {"num_frames": 10}}})
    slurm = str(REPO / "profiles/slurm")
    proc = dry_run(run_files, config, "--profile", slurm, "--cores", "64",
                   "results/sim/volume_curve.csv")
    vae = [x for x in proc.stdout.splitlines() if " vae --averages" in x]
    assert len(vae) == 1 and "torchrun --standalone --nproc_per_node=4 -m spiscape vae" in vae[0]
    # without a profile the VAE is one process
    vae = [x for x in dry_run(run_files, config, "results/sim/volume_curve.csv").stdout
           .splitlines() if " vae --averages" in x]
    assert vae and "torchrun" not in vae[0]
