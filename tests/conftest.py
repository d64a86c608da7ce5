"""Shared fixtures: tiny simulated datasets made once per test session."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist each worker gets its share of the cores for torch, BLAS and OpenMP
    (``make test`` runs ``-n auto``: one worker per core). Left alone, every worker would start a
    thread per core and the workers would oversubscribe the machine."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    import torch
    from threadpoolctl import threadpool_limits

    share = max(1, (os.cpu_count() or 1) // int(workers))
    torch.set_num_threads(share)
    threadpool_limits(share)


def venv_executable(name: str) -> str:
    """An executable installed beside the running Python (the project's virtual environment)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


@pytest.fixture(scope="session")
def cupy():
    """CuPy with a usable CUDA device; the test is skipped otherwise (no CuPy, no driver, no
    device)."""
    module = pytest.importorskip("cupy")
    try:
        devices = module.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - a CuPy without a driver
        devices = 0
    if devices == 0:
        pytest.skip("no CUDA device")
    return module


@pytest.fixture
def env_with_venv_path():
    """Environment whose PATH starts with the venv, so Snakemake's shell finds `spiscape`."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small simulated dataset: two clearly different populations on a coarse detector."""
    from spiscape.simulate.run import SimulationParams, simulate_dataset

    out = tmp_path_factory.mktemp("tiny")
    params = SimulationParams(
        num_frames=240, seed=5, mean_photons=1500, binning=6, grid_size=48,
        fractions={"cube": 0.5, "rod": 0.5}, chunk_frames=120,
    )
    simulate_dataset(params, out)
    return out


@pytest.fixture(scope="session")
def one_view_photons(tiny_dataset, tmp_path_factory):
    """Near-noiseless frames of the tiny dataset's cube at one orientation, each turned in-plane
    to one of 12 angles (those of an EMC with num_rot 12, friedel off): (detector, cube volume,
    quaternion, photon file)."""
    import numpy as np

    from spiscape.emc import geometry
    from spiscape.io import SparsePhotons, read_detector, write_photons
    from spiscape.io.truth import read_truth
    from spiscape.orient.rotations import to_matrix
    from spiscape.simulate.frames import slice_volume

    out = tmp_path_factory.mktemp("one_view")
    det = read_detector(tiny_dataset / "detector.h5")
    cube = np.asarray(read_truth(tiny_dataset / "truth.h5").volumes[0], dtype=np.float64)
    q = np.stack([det.qx, det.qy, det.qz]).astype(np.float64)
    quat = np.array([0.9, 0.2, 0.3, 0.25]) / np.linalg.norm([0.9, 0.2, 0.3, 0.25])
    r0 = to_matrix(quat)[0]
    turns = np.repeat(geometry.rotation_angles(12, friedel=False), 4)
    zero = np.zeros_like(turns)
    rz = to_matrix(np.stack([np.cos(turns / 2), zero, zero, np.sin(turns / 2)], axis=1))
    lam = slice_volume(cube, q, r0[None] @ rz)
    lam[:, det.mask == 2] = 0
    lam *= 2e5 / lam.sum(axis=1, keepdims=True)
    counts = np.random.default_rng(1).poisson(lam).astype(np.int32)
    write_photons(SparsePhotons.from_dense(counts), out / "photons.h5")
    return det, cube, quat, out / "photons.h5"
