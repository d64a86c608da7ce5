"""Dense CXI frames converted to sparse photons."""

import numpy as np
import pytest

from spiscape.errors import InputError
from spiscape.io import SparsePhotons, read_cxi, read_photons, write_cxi, write_photons
from spiscape.io import cxi as cxi_module


def dense_frames(num_frames=12, shape=(4, 5), seed=1):
    rng = np.random.default_rng(seed)
    return rng.poisson(0.5, size=(num_frames,) + shape).astype(np.int16)


def test_images_flatten_row_major(tmp_path):
    dense = dense_frames()
    write_cxi(dense, tmp_path / "run.cxi")
    photons = read_cxi(tmp_path / "run.cxi")
    assert photons.num_pix == 20
    np.testing.assert_array_equal(photons.to_dense(), dense.reshape(12, 20))
    assert photons.equals(read_photons(tmp_path / "run.cxi"))  # a CXI file is a dataset too


def test_conversion_in_blocks_and_subsets(tmp_path, monkeypatch):
    dense = dense_frames(30).reshape(30, 20).astype(np.float32)  # integral floats are fine
    write_cxi(dense, tmp_path / "run.cxi")
    monkeypatch.setattr(cxi_module, "_BLOCK_BYTES", 7 * 20 * 4)  # 7 frames per block
    whole = SparsePhotons.from_dense(dense.astype(np.int32))
    assert read_cxi(tmp_path / "run.cxi").equals(whole)
    for frames in ([29, 0, 3, 3, 17], slice(2, 25, 5), slice(6, 16)):
        assert read_cxi(tmp_path / "run.cxi", frames=frames).equals(whole.select(frames))


def test_mixed_dataset_of_cxi_and_sparse_files(tmp_path):
    dense = dense_frames()
    write_cxi(dense, tmp_path / "a.cxi")
    write_photons(SparsePhotons.from_dense(dense.reshape(12, 20)), tmp_path / "b.h5")
    both = read_photons([tmp_path / "a.cxi", tmp_path / "b.h5"], frames=[0, 12, 23], num_pix=20)
    np.testing.assert_array_equal(both.to_dense(), dense.reshape(12, 20)[[0, 0, 11]])


@pytest.mark.parametrize(
    ("value", "word"), [(0.5, "integer"), (np.nan, "NaN"), (-2.0, "negative"), (np.inf, "NaN")]
)
def test_values_that_are_not_photon_counts(tmp_path, value, word):
    dense = dense_frames().astype(np.float64)
    dense[4, 2, 3] = value
    write_cxi(dense, tmp_path / "bad.cxi")
    with pytest.raises(InputError, match=f"bad.cxi: frame 4 pixel 13: .*{word}"):
        read_cxi(tmp_path / "bad.cxi")


def test_a_sparse_file_is_not_cxi(tmp_path):
    write_photons(SparsePhotons.from_dense(np.eye(3, dtype=int)), tmp_path / "p.h5")
    with pytest.raises(InputError, match="not a CXI file"):
        read_cxi(tmp_path / "p.h5")
