"""Orientation and gain of 2D class averages against Ewald slices of a reference 3D intensity.

:mod:`~spiscape.orient.rotations` (SO(3) grid, point groups, asymmetric unit, misorientation),
:mod:`~spiscape.orient.slices` (Ewald points, references, batched slicing) and
:mod:`~spiscape.orient.search` (grid search, refinement, gain). Output ``orientation.h5``:
``quaternion (A, 4)`` scalar first (w, x, y, z), w >= 0, reduced to the fundamental zone of the
point group, such that average a shows I(R_a q) at its grid points' q (the simulator's
convention); ``cc (A,)``, ``gain (A,)`` = best CC / mean CC over the grid, ``mean_cc (A,)``.
"""

from spiscape.orient.search import OrientationResult, orient_averages

__all__ = ["OrientationResult", "orient_averages"]
