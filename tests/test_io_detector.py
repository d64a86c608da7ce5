"""Detector geometry: 2D coordinates, assembly, and HDF5/ASCII round trips."""

import h5py
import numpy as np
import pytest

from spiscape.errors import InputError
from spiscape.io import Detector, read_detector, write_detector


def flat_detector(half=3, detd=50.0, ewald_rad=40.0, background=False) -> Detector:
    """A (2 half + 1)² flat detector, pixels row-major (rows are y), beam at the centre."""
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    cy, cx = np.meshgrid(offsets, offsets, indexing="ij")
    cx, cy = cx.ravel(), cy.ravel()
    length = np.sqrt(cx**2 + cy**2 + detd**2)
    mask = np.zeros(cx.size, dtype=np.uint8)
    mask[0], mask[-1] = 1, 2
    return Detector(
        qx=ewald_rad * cx / length,
        qy=ewald_rad * cy / length,
        qz=ewald_rad * (detd / length - 1),
        corr=(detd / length) ** 3,
        mask=mask,
        detd=detd,
        ewald_rad=ewald_rad,
        background=np.linspace(0, 1, cx.size) if background else None,
    )


def assert_same(a: Detector, b: Detector, rtol=0.0):
    for name in ("qx", "qy", "qz", "corr"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=rtol, atol=0)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert b.mask.dtype == np.uint8
    assert a.detd == pytest.approx(b.detd, abs=1e-6)
    assert a.ewald_rad == pytest.approx(b.ewald_rad, abs=1e-6)


def test_coords_2d_recover_pixel_positions_in_both_qz_conventions():
    det = flat_detector()
    cx, cy = det.coords_2d()
    offsets = np.arange(-3, 4)
    np.testing.assert_allclose(cx, np.tile(offsets, 7), atol=1e-12)
    np.testing.assert_allclose(cy, np.repeat(offsets, 7), atol=1e-12)
    det.qz = -det.qz  # files with qz >= 0, as some Dragonfly detectors have
    np.testing.assert_allclose(det.coords_2d()[0], cx, atol=1e-12)


def test_assemble_puts_values_back_on_the_grid_with_the_beam_at_the_centre():
    det = flat_detector(half=2)
    values = np.arange(det.num_pix, dtype=float)
    image = det.assemble(values)
    assert image.shape == (5, 5)
    np.testing.assert_array_equal(image, values.reshape(5, 5))  # row-major, rows are y
    assert image[2, 2] == values[det.num_pix // 2]
    stack = det.assemble(np.stack([values, 2 * values]), fill=0)
    np.testing.assert_array_equal(stack[1], 2 * image)


def test_hdf5_round_trip_is_exact_and_keeps_the_background(tmp_path):
    det = flat_detector(background=True)
    write_detector(det, tmp_path / "det.h5")
    back = read_detector(tmp_path / "det.h5")
    assert_same(det, back)
    np.testing.assert_array_equal(back.background, det.background)
    with h5py.File(tmp_path / "det.h5") as f:  # Dragonfly's layout
        assert f["detd"].shape == () and f["mask"].dtype == np.uint8
        assert f["qx"].dtype == np.float64


def test_ascii_and_hdf5_hold_the_same_detector(tmp_path):
    det = flat_detector()
    write_detector(det, tmp_path / "det.dat")
    lines = (tmp_path / "det.dat").read_text().splitlines()
    assert lines[0] == f"{det.num_pix} 50.000000 40.000000"
    assert len(lines) == det.num_pix + 1 and len(lines[1].split()) == 5
    from_ascii = read_detector(tmp_path / "det.dat")
    assert_same(det, from_ascii, rtol=1e-15)  # %21.15e keeps 16 significant digits
    write_detector(from_ascii, tmp_path / "again.h5")
    assert_same(from_ascii, read_detector(tmp_path / "again.h5"))


def test_old_style_ascii_needs_detd_and_ewald_rad_from_the_caller(tmp_path):
    det = flat_detector()
    write_detector(det, tmp_path / "det.dat")
    lines = (tmp_path / "det.dat").read_text().splitlines()
    old = tmp_path / "old.dat"
    old.write_text("\n".join([lines[0].split()[0]] + lines[1:]) + "\n")
    with pytest.raises(InputError, match="detd"):
        read_detector(old)
    assert_same(det, read_detector(old, detd=50.0, ewald_rad=40.0), rtol=1e-15)


def test_validate_names_the_problem():
    det = flat_detector()
    det.validate()
    det.corr[3] = -1
    with pytest.raises(InputError, match="pixel 3: corr"):
        det.validate("det.h5")
