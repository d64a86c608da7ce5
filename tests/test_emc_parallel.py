"""EMC over MPI ranks and across a killed run: the same answer either way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from tests.conftest import venv_executable

EMC_ARGS = ["--num-classes", "4", "--num-rot", "12", "--seed", "4"]


def classify(dataset, out, *extra, launcher=(), wait=True):
    cmd = [*launcher, sys.executable, "-m", "spiscape", "classify2d",
           "--photons", str(dataset / "photons.h5"), "--detector", str(dataset / "detector.h5"),
           "--out", str(out), *EMC_ARGS, *extra]
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def read(path):
    with h5py.File(path) as f:
        return {k: f[k][:] for k in ("intens", "occupancies", "scale", "frames", "best_rotation")}


@pytest.mark.mpi
def test_two_ranks_equal_one(tiny_dataset, tmp_path):
    mpiexec = venv_executable("mpiexec")
    one = read(classify(tiny_dataset, tmp_path / "one.h5", "--iterations", "6"))
    two_path = classify(tiny_dataset, tmp_path / "two.h5", "--iterations", "6",
                        launcher=(mpiexec, "--oversubscribe", "-n", "2"))
    with h5py.File(two_path) as f:
        assert f.attrs["ranks"] == 2
    two = read(two_path)
    np.testing.assert_array_equal(one["frames"], two["frames"])
    np.testing.assert_allclose(
        two["intens"], one["intens"], rtol=1e-3, atol=1e-6 * one["intens"].max()
    )
    np.testing.assert_allclose(two["occupancies"], one["occupancies"], atol=1e-3)
    np.testing.assert_allclose(two["scale"], one["scale"], rtol=1e-4)


def test_killed_run_resumes_to_the_same_result(tiny_dataset, tmp_path):
    # a fixed dense/CSR split: 'auto' measures a timing, and the reference run is another run
    iterations = ["--iterations", "150", "--sparse-below", "0.2"]
    reference = read(classify(tiny_dataset, tmp_path / "ref.h5", *iterations))
    out = tmp_path / "killed.h5"
    checkpoint = tmp_path / "killed.ckpt.h5"
    proc = classify(tiny_dataset, out, *iterations, wait=False)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists():
            try:
                with h5py.File(checkpoint, "r") as f:
                    done = int(f["iteration"][()])
            except OSError:
                done = 0
            if done >= 3:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= done < 150 and not out.exists()
    resumed = read(classify(tiny_dataset, out, *iterations, "--resume"))
    for key in reference:
        np.testing.assert_allclose(resumed[key], reference[key], rtol=1e-6, atol=1e-9)
    assert not checkpoint.exists()


def test_resume_refuses_a_checkpoint_of_other_parameters(tiny_dataset, tmp_path):
    out = tmp_path / "r.h5"
    proc = classify(tiny_dataset, out, "--iterations", "40", wait=False)
    checkpoint = tmp_path / "r.ckpt.h5"
    deadline = time.time() + 60
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists()
    cmd = [sys.executable, "-m", "spiscape", "classify2d", "--photons",
           str(tiny_dataset / "photons.h5"), "--detector", str(tiny_dataset / "detector.h5"),
           "--out", str(out), "--num-classes", "5", "--resume"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "r.ckpt.h5" in result.stderr.splitlines()[-1]
