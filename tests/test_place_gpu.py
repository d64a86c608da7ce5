"""spiscape place on a GPU against the CPU (skipped where no GPU is usable)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_place import reference  # noqa: F401 - the module-scoped fixture

pytestmark = pytest.mark.gpu


def test_gpu_placement_matches_cpu(cupy, reference, tiny_dataset):  # noqa: F811
    from spiscape.embed.place import Placer, Reference
    from spiscape.io import read_detector, read_photons

    ref = Reference.from_results(reference)
    det = read_detector(tiny_dataset / "detector.h5")
    counts = read_photons(tiny_dataset / "photons.h5").to_dense()
    cpu = Placer(ref, det).place(counts)
    gpu = Placer(ref, det, xp=cupy).place(counts)
    np.testing.assert_array_equal(gpu["label"], cpu["label"])
    np.testing.assert_allclose(gpu["coords"], cpu["coords"], rtol=1e-4, atol=1e-5)
    assert np.mean(gpu["average"] == cpu["average"]) > 0.99
