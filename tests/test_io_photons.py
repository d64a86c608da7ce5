"""Sparse photons: the in-memory container, the two file formats, subsets, shards and chunks."""

import h5py
import numpy as np
import pytest

from spiscape.io import (
    PhotonWriter,
    SparsePhotons,
    count_frames,
    iter_chunks,
    photon_files,
    read_photons,
    read_shard,
    shard_bounds,
    write_photons,
)

NUM_PIX = 32


def dense_frames(num_frames=40, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(0.4, size=(num_frames, NUM_PIX)).astype(np.int32)
    dense[3] = 0  # an empty frame
    return dense


def test_container_agrees_with_dense_frames():
    dense = dense_frames()
    photons = SparsePhotons.from_dense(dense)
    photons.validate()
    np.testing.assert_array_equal(photons.to_dense(), dense)
    np.testing.assert_array_equal(photons.to_csr().toarray(), dense)
    assert photons.to_csr().dtype == np.float32
    np.testing.assert_array_equal(photons.powder(), dense.sum(axis=0))
    np.testing.assert_array_equal(photons.photons_per_frame(), dense.sum(axis=1))
    ones, multi, counts = photons.frame(5)
    np.testing.assert_array_equal(ones, np.flatnonzero(dense[5] == 1))
    np.testing.assert_array_equal(counts, dense[5][multi])
    rebuilt = SparsePhotons.from_frames(NUM_PIX, [photons.frame(i) for i in range(len(dense))])
    assert rebuilt.equals(photons)
    pick = [7, 2, 2, 39]
    np.testing.assert_array_equal(photons.to_dense(pick), dense[pick])
    np.testing.assert_array_equal(photons.select(slice(4, 30, 3)).to_dense(), dense[4:30:3])
    halves = [photons.select(slice(0, 15)), photons.select(slice(15, None))]
    assert SparsePhotons.concatenate(halves).equals(photons)


def test_csr_sums_repeated_pixels():
    photons = SparsePhotons.from_frames(4, [([1, 1], [1], [3]), ([], [], [])])
    np.testing.assert_array_equal(photons.to_csr(np.int32).toarray(), [[0, 5, 0, 0], [0] * 4])
    np.testing.assert_array_equal(photons.to_dense(), [[0, 5, 0, 0], [0] * 4])


@pytest.mark.parametrize("suffix", [".h5", ".emc"])
def test_write_read_round_trip(tmp_path, suffix):
    photons = SparsePhotons.from_dense(dense_frames())
    write_photons(photons, tmp_path / f"p{suffix}")
    assert read_photons(tmp_path / f"p{suffix}").equals(photons)
    assert count_frames(tmp_path / f"p{suffix}") == 40
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_files_have_dragonfly_layout(tmp_path):
    photons = SparsePhotons.from_dense(dense_frames())
    write_photons(photons, tmp_path / "p.emc")
    raw = np.fromfile(tmp_path / "p.emc", dtype="<i4")
    assert raw[:2].tolist() == [40, NUM_PIX] and not raw[2:256].any()
    n, n_ones, n_multi = 40, photons.place_ones.size, photons.place_multi.size
    assert raw.size == 256 + 2 * n + n_ones + 2 * n_multi
    np.testing.assert_array_equal(raw[256 + 2 * n:256 + 2 * n + n_ones], photons.place_ones)
    write_photons(photons, tmp_path / "p.h5")
    with h5py.File(tmp_path / "p.h5") as f:
        assert f["num_pix"].shape == (1,) and f["num_pix"].dtype == np.int32
        assert h5py.check_vlen_dtype(f["place_ones"].dtype) == np.int32
        np.testing.assert_array_equal(f["multi"][:], photons.multi)
        np.testing.assert_array_equal(f["count_multi"][5], photons.frame(5)[2])


def test_hdf5_without_length_tables_and_with_scalar_num_pix(tmp_path):
    photons = SparsePhotons.from_dense(dense_frames())
    path = tmp_path / "p.h5"
    write_photons(photons, path)
    with h5py.File(path, "a") as f:
        del f["ones"], f["multi"], f["num_pix"]
        f["num_pix"] = np.int64(NUM_PIX)
    assert read_photons(path).equals(photons)


def test_hdf5_and_emc_convert_to_each_other_identically(tmp_path):
    photons = SparsePhotons.from_dense(dense_frames())
    write_photons(photons, tmp_path / "a.h5")
    write_photons(read_photons(tmp_path / "a.h5"), tmp_path / "b.emc")
    write_photons(read_photons(tmp_path / "b.emc"), tmp_path / "c.h5")
    write_photons(read_photons(tmp_path / "c.h5"), tmp_path / "d.emc")
    assert (tmp_path / "b.emc").read_bytes() == (tmp_path / "d.emc").read_bytes()
    assert read_photons(tmp_path / "c.h5").equals(photons)


def write_three_files(tmp_path) -> tuple[list, SparsePhotons]:
    whole = SparsePhotons.from_dense(dense_frames(45))
    paths = [tmp_path / "a.h5", tmp_path / "b.emc", tmp_path / "c.h5"]
    for path, frames in zip(paths, (slice(0, 20), slice(20, 21), slice(21, 45)), strict=True):
        write_photons(whole.select(frames), path)
    return paths, whole


def test_list_of_files_and_list_file(tmp_path):
    paths, whole = write_three_files(tmp_path)
    assert read_photons(paths).equals(whole)
    listing = tmp_path / "frames.txt"
    listing.write_text(f"# selected runs\na.h5\n\n{paths[1]}  # absolute path\nc.h5\n")
    assert photon_files(listing) == [tmp_path / "a.h5", paths[1], tmp_path / "c.h5"]
    assert read_photons(str(listing)).equals(whole)
    assert count_frames(listing) == 45


@pytest.mark.parametrize(
    "frames",
    [slice(5, 30), slice(None, None, 4), slice(19, 22), [44, 0, 20, 20, 7], np.arange(45) % 3 == 0,
     []],
)
def test_reading_frames_equals_selecting_from_the_whole(tmp_path, frames):
    paths, whole = write_three_files(tmp_path)
    assert read_photons(paths, frames=frames).equals(whole.select(frames))


def test_shards_over_ranks_make_up_the_whole(tmp_path):
    paths, whole = write_three_files(tmp_path)
    for size in range(1, 5):
        shards = [read_shard(paths, rank, size, num_pix=NUM_PIX) for rank in range(size)]
        assert [start for _, start in shards] == [shard_bounds(45, r, size)[0] for r in range(size)]
        assert SparsePhotons.concatenate([p for p, _ in shards]).equals(whole)
        lengths = [p.num_frames for p, _ in shards]
        assert max(lengths) - min(lengths) <= 1
    assert shard_bounds(3, 3, 4) == (3, 3)  # more ranks than frames: empty shards


def test_iter_chunks_covers_everything_and_streams_into_a_writer(tmp_path):
    paths, whole = write_three_files(tmp_path)
    chunks = list(iter_chunks(paths, 7))
    assert [start for start, _ in chunks] == list(range(0, 45, 7))
    assert SparsePhotons.concatenate([c for _, c in chunks]).equals(whole)
    for suffix in (".h5", ".emc"):
        with PhotonWriter(tmp_path / f"streamed{suffix}", NUM_PIX) as out:
            for _, chunk in chunks:
                out.append(chunk)
        assert read_photons(tmp_path / f"streamed{suffix}").equals(whole)


def test_failed_write_leaves_no_file(tmp_path):
    photons = SparsePhotons.from_dense(dense_frames())
    with pytest.raises(RuntimeError), PhotonWriter(tmp_path / "x.emc", NUM_PIX) as out:
        out.append(photons)
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
