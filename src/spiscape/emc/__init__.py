"""EMC 2D classification of sparse photon frames (Dragonfly's 2D mode semantics, our code)."""

from spiscape.emc.run import EMC2D, EMCParams, replicate_frames

__all__ = ["EMC2D", "EMCParams", "replicate_frames"]
