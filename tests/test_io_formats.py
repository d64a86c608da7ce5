"""The files handed between stages: one module each under spiscape.io, a reader that validates
and an atomic writer, and no second reader anywhere else."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest

from spiscape.errors import InputError
from spiscape.io.averages import Averages, read_averages, write_averages
from spiscape.io.orientation import read_orientation, write_orientation
from spiscape.io.replicate import DATASETS, read_replicate, read_replicates, write_replicate
from tests.conftest import REPO


def averages(count=3, size=5):
    rng = np.random.default_rng(0)
    return Averages(intens=rng.random((count, size, size)), support=np.ones((size, size), bool),
                    replicate=np.arange(count, dtype=np.int32) % 2,
                    klass=np.arange(count, dtype=np.int32), frames=np.full(count, 7.0),
                    count=count, size=size)


def test_averages_round_trip_and_refusals(tmp_path):
    written = averages()
    write_averages(tmp_path / "a.h5", written, ["rep0.h5", "rep1.h5"], 5.0)
    back = read_averages(tmp_path / "a.h5")
    for key in ("intens", "support", "replicate", "klass", "frames"):
        np.testing.assert_array_equal(getattr(back, key), getattr(written, key))
    assert (back.count, back.size) == (3, 5)
    with h5py.File(tmp_path / "a.h5") as f:
        assert sorted(f) == ["class", "frames", "intens", "replicate", "support"]
        assert f.attrs["min_frames"] == 5.0
    assert read_averages(tmp_path / "a.h5", with_intens=False).intens is None
    bad = averages()
    bad.intens[1, 2, 2] = np.nan
    write_averages(tmp_path / "nan.h5", bad, [], 1.0)
    with pytest.raises(InputError, match="nan.h5: intens holds NaN.*first in average 1"):
        read_averages(tmp_path / "nan.h5")
    empty = averages()
    empty.support[:] = False
    write_averages(tmp_path / "empty.h5", empty, [], 1.0)
    with pytest.raises(InputError, match="support is empty"):
        read_averages(tmp_path / "empty.h5")


def replicate_datasets(n=4, m=2, s=5):
    return {"intens": np.ones((m, s, s)), "frames": np.arange(n), "occupancies":
            np.full((n, m), 1.0 / m, np.float32), "best_rotation": np.zeros(n, np.int32),
            "best_class": np.zeros(n, np.int32), "scale": np.ones(n), "log": np.zeros(2),
            "angles": np.zeros(3), "model_pixels": np.arange(7), "support": np.ones((s, s), bool),
            "empty_frames": np.zeros(0, np.int64)}


def test_replicate_round_trip_and_refusals(tmp_path):
    write_replicate(tmp_path / "rep3.h5", replicate_datasets(), {"params": '{"replicate": 3}'})
    rep = read_replicate(tmp_path / "rep3.h5")
    assert rep.number == 3 and rep.frames.dtype == np.int64 and rep.intens.shape == (2, 5, 5)
    with h5py.File(tmp_path / "rep3.h5") as f:
        assert list(f) == sorted(DATASETS)
        assert f["occupancies"].compression == "gzip"
    light = read_replicate(tmp_path / "rep3.h5", models=False)
    assert light.intens is None and light.occupancies.shape == (4, 2)
    with pytest.raises(InputError, match="replicate numbers repeat"):
        read_replicates([tmp_path / "rep3.h5", tmp_path / "rep3.h5"])
    broken = replicate_datasets()
    broken["occupancies"] = np.ones((4, 3), np.float32)  # 3 classes against 2 models
    write_replicate(tmp_path / "bad.h5", broken, {})
    with pytest.raises(InputError, match="bad.h5: occupancies .* 2 classes"):
        read_replicate(tmp_path / "bad.h5")
    with pytest.raises(ValueError, match="missing"):
        write_replicate(tmp_path / "x.h5", {"intens": np.ones((1, 2, 2))}, {})
    assert not (tmp_path / "x.h5").exists()


def test_orientation_round_trip_and_refusals(tmp_path):
    quat = np.array([[-1.0, 0, 0, 0], [0, 2.0, 0, 0], [1, 1, 0, 0]])
    data = {"quaternion": quat, "cc": [0.9, 0.8, 0.7], "gain": [1.2, -1.0, np.nan],
            "mean_cc": [0.5] * 3, "grid_cc": np.zeros((3, 0))}
    write_orientation(tmp_path / "o.h5", data, {"point_group": "m-3m"})
    ori = read_orientation(tmp_path / "o.h5", count=3)
    np.testing.assert_allclose(np.linalg.norm(ori.quaternion, axis=1), 1.0)
    assert (ori.quaternion[:, 0] >= 0).all()
    np.testing.assert_array_equal(ori.gain, [1.2, 1.0, 1.0])  # not positive or finite: 1
    assert ori.attrs["point_group"] == "m-3m"
    with pytest.raises(InputError, match="one per average"):
        read_orientation(tmp_path / "o.h5", count=4)
    write_orientation(tmp_path / "zero.h5", {**data, "quaternion": np.zeros((3, 4))}, {})
    with pytest.raises(InputError, match="finite and nonzero"):
        read_orientation(tmp_path / "zero.h5")


def test_each_contract_has_one_reader():
    # the readers of the files handed between stages live in spiscape.io, nowhere else
    names = ("read_averages", "read_replicate", "read_replicates", "read_orientation",
             "read_embedding", "read_tile", "read_commonlines", "write_averages",
             "write_replicate", "write_orientation", "write_embedding", "write_tile",
             "write_commonlines", "read_landscape", "write_landscape", "read_volumes",
             "write_volumes", "read_latent", "write_latent", "read_frame_latent",
             "write_frame_latent", "write_phasing", "read_converged", "write_curve",
             "read_truth", "write_truth", "plain", "load_plain", "read_placed", "write_placed",
             "read_amortise")
    homes = {}
    for path in (REPO / "src/spiscape").rglob("*.py"):
        for name in re.findall(r"^def (\w+)\(", path.read_text(), re.M):
            if name in names:
                homes.setdefault(name, []).append(path.relative_to(REPO / "src").as_posix())
    assert all(len(where) == 1 and where[0].startswith("spiscape/io/")
               for where in homes.values()), homes
    assert set(homes) == set(names)


def test_no_bench_or_test_imports_a_command():
    # commands parse arguments and call the library; what a benchmark or a test needs lives in
    # the library (the command line itself is tested through spiscape.cli)
    offenders = [p.relative_to(REPO).as_posix()
                 for folder in ("bench", "tests") for p in (REPO / folder).rglob("*.py")
                 if re.search(r"^\s*(from spiscape\.commands|import spiscape\.commands)",
                              p.read_text(), re.M)]
    assert offenders == []


def test_embedding_round_trip_and_refusals(tmp_path):
    from spiscape.io.embedding import read_embedding, write_embedding

    coords = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    write_embedding(tmp_path / "e.h5", {"coords": coords, "labels": np.array([0, 0, 1])},
                    {"method": "pca"})
    emb = read_embedding(tmp_path / "e.h5", count=3)
    np.testing.assert_array_equal(emb.coords, coords)
    assert emb.method == "pca" and emb.labels.tolist() == [0, 0, 1]
    with pytest.raises(InputError, match="3 averages embedded, 4 expected"):
        read_embedding(tmp_path / "e.h5", count=4)
    write_embedding(tmp_path / "bad.h5", {"coords": coords, "labels": np.array([0, 1])}, {})
    with pytest.raises(InputError, match="do not match"):
        read_embedding(tmp_path / "bad.h5")


def test_io_modules_share_no_private_names_and_form_no_circle():
    io = REPO / "src/spiscape/io"
    graph = {}
    for path in io.glob("*.py"):
        text = path.read_text()
        imports = re.findall(r"^\s*from spiscape\.io\.(\w+) import ([^\n(]+|\([^)]*\))", text,
                             re.M)
        for _, names in imports:
            assert not re.search(r"(^|[\s(,])_\w", names), (path.name, names)
        graph[path.stem] = {module for module, _ in imports}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, (*seen, n)))
                   for n in graph.get(start, ()))

    assert not [m for m in graph if reaches(m, m)], graph
