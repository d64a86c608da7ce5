"""Dataset check: what the frames of a dataset hold, before any reconstruction.

The first thing a scientist looks at for a new run: how many frames, how many photons per frame,
the virtual powder pattern (sum of all frames) and its radial profile, and on simulated data how
the populations are represented. It also validates the photons against the detector on the way.
"""

from spiscape.qc.stats import DatasetStats, accumulate, radial_profile

__all__ = ["DatasetStats", "accumulate", "radial_profile"]
