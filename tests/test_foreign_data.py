"""The validation matrix's Dragonfly inputs (bench/foreign_data.py): the coarse-grained PDB that
Dragonfly's make_densities reads, with the density box padded so that its periodic low-pass
blurs every shape alike (a cube that fills its box otherwise keeps a sharp surface)."""

import importlib.util
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_foreign_data():
    spec = importlib.util.spec_from_file_location("foreign_data", BENCH / "foreign_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_pdb_columns(path: Path):
    """The fixed PDB columns a PDB reader (Dragonfly's among them) takes: x, y, z (Angstrom),
    occupancy and element."""
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("ATOM"):
            rows.append((float(line[30:38]), float(line[38:46]), float(line[46:54]),
                         float(line[54:60]), line[76:78].strip()))
    return rows


def test_pdb_padding_widens_the_density_box_symmetrically_with_two_light_atoms(tmp_path):
    fd = load_foreign_data()
    rng = np.random.default_rng(0)
    points = fd.superball_points(5.0, 200.0, 1.0, rng)  # a cube of edge 10 nm, in nm
    fd.write_pdb(points, tmp_path / "plain.pdb")
    fd.write_pdb(points, tmp_path / "padded.pdb", pad_nm=2.5)
    plain = read_pdb_columns(tmp_path / "plain.pdb")
    padded = read_pdb_columns(tmp_path / "padded.pdb")
    assert len(plain) == len(points) and {r[4] for r in plain} == {"AU"}
    assert np.allclose([r[:3] for r in plain], points * 10.0, atol=1e-3)
    assert padded[:-2] == plain and all(r[3] > 0.5 for r in padded)  # occupancy: kept
    light = np.array([r[:3] for r in padded[-2:]])
    assert [r[4] for r in padded[-2:]] == ["H", "H"]
    half = 10.0 * (np.abs(points).max() + 2.5)
    assert np.allclose(light, [[-half] * 3, [half] * 3], atol=1e-3)
    # the bounding box (Dragonfly's density box) is centred on the particle, 2.5 nm wider a side
    xyz = np.array([r[:3] for r in padded])
    assert np.allclose(xyz.min(0), -half, atol=1e-3) and np.allclose(xyz.max(0), half, atol=1e-3)
    assert np.all(xyz[:-2].max(0) < half - 24.0)
