"""Simulated SPI datasets of heterogeneous gold nanoparticles (cubes melting into spheres).

``simulate_dataset(params, out_dir)`` writes Dragonfly photons and detector files plus the ground
truth; the pieces (geometry, shapes, intensities, frames) are small functions usable on their own.
"""

from spiscape.io.truth import Truth, read_truth
from spiscape.simulate.detector import make_detector, q_per_voxel_inv_nm, wavelength_nm
from spiscape.simulate.run import LABELS, POPULATIONS, SimulationParams, simulate_dataset

__all__ = [
    "LABELS",
    "POPULATIONS",
    "SimulationParams",
    "Truth",
    "make_detector",
    "q_per_voxel_inv_nm",
    "read_truth",
    "simulate_dataset",
    "wavelength_nm",
]
