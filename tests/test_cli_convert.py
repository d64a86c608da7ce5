"""`spiscape convert` through the console-script entry point."""

import logging

import numpy as np
import pytest

from spiscape import cli
from spiscape.io import SparsePhotons, read_photons, write_cxi, write_detector, write_photons
from spiscape.io.detector import Detector


@pytest.fixture(autouse=True)
def cli_env():
    """Restore the logging set-up the CLI replaces."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def dense(num_frames=20, num_pix=16):
    return np.random.default_rng(3).poisson(0.5, size=(num_frames, num_pix))


def test_convert_between_formats(tmp_path):
    photons = SparsePhotons.from_dense(dense())
    write_photons(photons.select(slice(0, 12)), tmp_path / "a.h5")
    write_photons(photons.select(slice(12, 20)), tmp_path / "b.emc")
    q = np.zeros(16)
    write_detector(Detector(q, q, q, q + 1, q.astype(np.uint8), 10.0, 10.0), tmp_path / "det.h5")
    args = ["convert", str(tmp_path / "a.h5"), str(tmp_path / "b.emc"), "-o"]
    args += [str(tmp_path / "all.emc"), "--detector", str(tmp_path / "det.h5")]
    assert cli.main(args + ["--chunk-frames", "5"]) == 0
    assert read_photons(tmp_path / "all.emc").equals(photons)
    assert cli.main(["convert", str(tmp_path / "all.emc"), "-o", str(tmp_path / "all.h5")]) == 0
    assert read_photons(tmp_path / "all.h5").equals(photons)
    write_cxi(dense().reshape(20, 4, 4), tmp_path / "run.cxi")
    assert cli.main(["convert", str(tmp_path / "run.cxi"), "-o", str(tmp_path / "cxi.h5")]) == 0
    assert read_photons(tmp_path / "cxi.h5").equals(photons)


def test_truncated_input_is_one_line_and_exit_2(tmp_path, capsys):
    write_photons(SparsePhotons.from_dense(dense()), tmp_path / "run.emc")
    data = (tmp_path / "run.emc").read_bytes()
    (tmp_path / "run.emc").write_bytes(data[:-10])
    capsys.readouterr()
    code = cli.main(["convert", str(tmp_path / "run.emc"), "-o", str(tmp_path / "out.h5")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1, err
    assert err.startswith("spiscape convert: error: ") and "run.emc: truncated" in err
    assert not (tmp_path / "out.h5").exists()


def test_detector_mismatch_and_unknown_output_type(tmp_path, capsys):
    write_photons(SparsePhotons.from_dense(dense()), tmp_path / "run.h5")
    q = np.zeros(10)
    write_detector(Detector(q, q, q, q + 1, q.astype(np.uint8), 10.0, 10.0), tmp_path / "det.dat")
    out = str(tmp_path / "out.emc")
    assert cli.main(["convert", str(tmp_path / "run.h5"), "-o", out, "--detector",
                     str(tmp_path / "det.dat")]) == 2
    assert "num_pix 16 does not match the detector's 10 pixels" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "run.h5"), "-o", str(tmp_path / "out.mrc")]) == 2
    assert "out.mrc: unknown photon file type" in capsys.readouterr().err


def test_an_input_without_frames_is_refused(tmp_path, capsys):
    write_photons(SparsePhotons.from_dense(np.zeros((0, 16), dtype=int)), tmp_path / "none.h5")
    capsys.readouterr()
    code = cli.main(["convert", str(tmp_path / "none.h5"), "-o", str(tmp_path / "out.emc")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "none.h5: no frames" in err and "nothing to convert" in err
    assert not (tmp_path / "out.emc").exists()
