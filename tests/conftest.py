"""Shared fixtures: tiny simulated datasets made once per test session."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def venv_executable(name: str) -> str:
    """An executable installed beside the running Python (the project's virtual environment)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


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
