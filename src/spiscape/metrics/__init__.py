"""Scores against the simulator's ground truth (truth.h5): used by tests, benchmarks and reports."""
