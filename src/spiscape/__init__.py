"""spiscape: structural landscapes of heterogeneous samples from X-ray single particle imaging."""

__version__ = "0.1.0"
