"""Common lines: polar sampling, the batched correlation, tiles and the merge, the CLI."""

from __future__ import annotations

import itertools

import h5py
import numpy as np
import pytest

from spiscape import cli
from spiscape.commonlines import (
    PolarParams,
    compute_matrix,
    compute_tile,
    correlate,
    pairable_averages,
    polar,
    tiles,
)
from spiscape.errors import ConfigError, InputError
from spiscape.simulate.detector import q_per_voxel_inv_nm
from spiscape.simulate.frames import quaternion_to_matrix
from spiscape.simulate.intensity import cube_form_factor, sphere_form_factor

SIZE = 61
DQ = q_per_voxel_inv_nm()  # 1/nm per pixel of the default detector (binning 4)


# ----------------------------------------------------------------------------- helpers
def grid_q(size=SIZE):
    """(x, y) pixel offsets from the beam of an S×S grid, x along the first axis."""
    c = (size - 1) / 2.0
    x, y = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    return x, y


def annulus(size=SIZE, inner=3.0, outer=28.5):
    x, y = grid_q(size)
    r = np.hypot(x, y)
    return (r >= inner) & (r <= outer)


def central_slice(rotation, amplitude, size=SIZE):
    """Noiseless central slice I(R q), q = (x, y, 0) pixels, of an analytic intensity."""
    x, y = grid_q(size)
    q = np.stack([x, y, np.zeros_like(x)], axis=-1) * DQ
    return amplitude(q @ rotation.T) ** 2


def cube(q, edge=42.0):
    return cube_form_factor(q, edge)


def sphere(q, diameter=52.0):
    return sphere_form_factor(np.linalg.norm(q, axis=-1), diameter / 2.0)


def rotation(axis, degrees):
    half = np.deg2rad(degrees) / 2
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    quat = np.concatenate([[np.cos(half)], np.sin(half) * axis])
    return quaternion_to_matrix(quat)[0]


def cube_group():
    """The 24 proper rotations of the cube (signed permutation matrices with det +1)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            m = np.zeros((3, 3))
            m[range(3), perm] = signs
            if np.linalg.det(m) > 0:
                out.append(m)
    return out


def line_angle(vector):
    return float(np.arctan2(vector[1], vector[0]) % np.pi)


def angle_gap(a, b):
    d = abs(a - b) % np.pi
    return min(d, np.pi - d)


def averages_dict(intens, support, path="mem.h5"):
    from spiscape.io.averages import Averages

    count = intens.shape[0]
    return Averages(intens=intens, support=support, replicate=np.zeros(count, np.int32),
                    klass=np.arange(count, dtype=np.int32), frames=np.ones(count), count=count,
                    size=intens.shape[1], path=path)


def write_averages(path, intens, support):
    with h5py.File(path, "w") as f:
        f["intens"] = intens
        f["support"] = support
        f["replicate"] = np.arange(intens.shape[0]) % 2
        f["class"] = np.arange(intens.shape[0]) // 2
    return path


@pytest.fixture(scope="module")
def small_set():
    """Seven noisy 31×31 averages: cube and sphere slices at random orientations."""
    rng = np.random.default_rng(5)
    rotations = quaternion_to_matrix(rng.normal(size=(7, 4)))
    images = [central_slice(rot, cube if k % 3 else sphere, 31)
              for k, rot in enumerate(rotations)]
    intens = np.array(images) * (1.0 + 0.05 * rng.standard_normal((7, 31, 31)))
    support = annulus(31, 2.5, 14.0)
    return np.where(support, intens, 0.0), support


# ----------------------------------------------------------------------------- polar
def test_polar_samples_of_a_linear_image_are_exact():
    # bilinear interpolation reproduces a linear function exactly
    x, y = grid_q(11)
    image = 2.0 + 0.5 * x - 0.25 * y
    support = np.ones((11, 11), bool)
    params = PolarParams(n_angles=8, r_min=1.0, r_max=None, transform="none", lines="diameter")
    lines, mask, signed = polar.sample_lines(image[None], support, params)
    theta = polar.line_angles(8)
    expect = 2.0 + np.outer(np.cos(theta), signed) * 0.5 - np.outer(np.sin(theta), signed) * 0.25
    assert mask.all() and signed.tolist() == [-5, -4, -3, -2, -1, 1, 2, 3, 4, 5]
    np.testing.assert_allclose(lines[0], expect, atol=1e-12)
    # the Friedel layout averages +r and -r: the odd (linear) part cancels
    friedel, _, radii = polar.sample_lines(image[None], support, PolarParams(
        n_angles=8, r_min=1.0, transform="none"))
    np.testing.assert_allclose(friedel[0], 2.0, atol=1e-12)
    assert radii.tolist() == [1, 2, 3, 4, 5]


def test_polar_mask_excludes_unmeasured_neighbours():
    support = np.ones((11, 11), bool)
    support[7, 5] = False  # the pixel at x = +2, y = 0
    params = PolarParams(n_angles=4, r_min=1.0, r_max=4.0, transform="none",
                         lines="diameter", missing="overlap")
    lines, mask, signed = polar.sample_lines(np.ones((1, 11, 11)), support, params)
    # line 0 runs along +x: only its sample at r = +2 needs that pixel
    assert not mask[0, signed.tolist().index(2.0)]
    assert mask[0, signed.tolist().index(-2.0)] and mask[1:].all()
    assert lines[0, 0, signed.tolist().index(2.0)] == 0.0
    # common layout drops that radius for every line
    _, mask_common, signed_common = polar.sample_lines(
        np.ones((1, 11, 11)), support, PolarParams(n_angles=4, r_min=1.0, r_max=4.0,
                                                   lines="diameter"))
    assert mask_common.all() and 2.0 not in signed_common.tolist()
    # Friedel layout fills the hidden half from its mate
    _, mask_friedel, _ = polar.sample_lines(np.ones((1, 11, 11)), support, PolarParams(
        n_angles=4, r_min=1.0, r_max=4.0, missing="overlap"))
    assert mask_friedel.all()


def test_normalise_and_transforms():
    lines = np.array([[[1.0, 2.0, 3.0, 99.0], [5.0, 5.0, 5.0, 5.0]]])
    mask = np.array([[True, True, True, False], [True, True, True, True]])
    out = polar.normalise_lines(lines, mask)
    np.testing.assert_allclose(out[0, 0], [-1 / np.sqrt(2), 0, 1 / np.sqrt(2), 0])
    assert np.all(out[0, 1] == 0)  # constant line: no variance
    logged = polar.transform_lines(np.array([[[0.0, 1.0, 3.0]]]), np.ones((1, 3), bool), "log")
    np.testing.assert_allclose(logged[0, 0], np.log1p([0.0, 1.0, 3.0]))
    # every transform is independent of the average's overall scale
    rng = np.random.default_rng(1)
    raw = rng.random((1, 6, 5))
    for name in polar.TRANSFORMS:
        a = polar.normalise_lines(polar.transform_lines(raw, np.ones((6, 5), bool), name),
                                  np.ones((6, 5), bool))
        b = polar.normalise_lines(polar.transform_lines(7 * raw, np.ones((6, 5), bool), name),
                                  np.ones((6, 5), bool))
        np.testing.assert_allclose(a, b, atol=1e-12)
    with pytest.raises(ConfigError):
        PolarParams(transform="sqrt")


# ----------------------------------------------------------------------------- correlation
def test_overlap_and_common_paths_match_brute_force():
    rng = np.random.default_rng(2)
    count, num_lines, num_r = 4, 5, 9
    mask = rng.random((num_lines, num_r)) > 0.2
    raw = rng.normal(size=(count, num_lines, num_r))
    lines = polar.normalise_lines(raw, mask)
    pair_i, pair_j = np.triu_indices(count, 1)
    cc, li, lj = correlate.correlate_pairs(lines, mask, pair_i, pair_j, batch_pairs=4,
                                           progress=False)
    min_count = max(3, correlate.MIN_OVERLAP_FRACTION * mask.sum(axis=1).max())
    for k, (i, j) in enumerate(zip(pair_i, pair_j, strict=True)):
        best = -np.inf
        for la in range(num_lines):
            for lb in range(num_lines):
                both = mask[la] & mask[lb]
                if both.sum() >= min_count:
                    best = max(best, np.corrcoef(raw[i, la, both], raw[j, lb, both])[0, 1])
        assert cc[k] == pytest.approx(best, abs=1e-12)
        both = mask[li[k]] & mask[lj[k]]
        assert np.corrcoef(raw[i, li[k], both], raw[j, lj[k], both])[0, 1] == pytest.approx(
            best, abs=1e-12)
    # with a full mask the one-product path equals the overlap path
    full = np.ones_like(mask)
    lines = polar.normalise_lines(raw, full)
    fast = correlate.correlate_pairs(lines, full, pair_i, pair_j, progress=False)
    slow = correlate.best_overlap_pairs(lines[pair_i], lines[pair_j], full)
    np.testing.assert_allclose(fast[0], slow[0], atol=1e-12)
    single = correlate.correlate_pairs(lines, full, pair_i, pair_j, workers=1, batch_pairs=1,
                                       progress=False)
    assert np.array_equal(fast[0], single[0]) and np.array_equal(fast[1], single[1])


def test_in_plane_rotated_copy_correlates_at_the_rotation_angle():
    base = rotation([1, 2, 3], 40.0)
    alpha = 33.0
    turned = base @ rotation([0, 0, 1], -alpha)  # the same slice, rotated in the plane by alpha
    support = annulus()
    intens = np.array([central_slice(base, cube), central_slice(turned, cube)])
    merged = compute_matrix(averages_dict(intens, support), PolarParams(), progress=False)
    assert merged["cc"][0, 1] > 0.99
    theta_i, theta_j = merged["angles"][0, 1]
    assert np.rad2deg(angle_gap(theta_j - theta_i, np.deg2rad(alpha))) <= 1.0
    assert np.array_equal(merged["angles"][1, 0], merged["angles"][0, 1][::-1])


def test_two_slices_of_a_cube_find_their_common_line():
    r1, r2 = rotation([1, 0.3, 0.2], 50.0), rotation([-0.4, 1, 0.7], 110.0)
    support = annulus()
    intens = np.array([central_slice(r1, cube), central_slice(r2, cube),
                       central_slice(r2, sphere)])
    merged = compute_matrix(averages_dict(intens, support), PolarParams(), progress=False)
    found = merged["angles"][0, 1]
    # the cube's symmetry makes every g R2 (g in its rotation group) a valid second slice
    gaps = []
    for g in cube_group():
        r2g = g @ r2
        u = np.cross(r1[:, 2], r2g[:, 2])
        u /= np.linalg.norm(u)
        true = line_angle(r1.T @ u), line_angle(r2g.T @ u)
        gaps.append(max(angle_gap(found[0], true[0]), angle_gap(found[1], true[1])))
    assert np.rad2deg(min(gaps)) <= 2.0
    assert merged["cc"][0, 1] > 0.99
    assert merged["cc"][0, 1] > merged["cc"][0, 2] + 0.01  # cube-cube beats cube-sphere


# ----------------------------------------------------------------------------- tiles
def test_tile_plan_covers_the_triangle_once():
    for count, num_tiles in [(2, 1), (7, 3), (10, 4), (5, 10)]:
        parts = [tiles.tile_pairs(count, k, num_tiles) for k in range(num_tiles)]
        i = np.concatenate([p[0] for p in parts])
        j = np.concatenate([p[1] for p in parts])
        ref_i, ref_j = np.triu_indices(count, 1)
        assert np.array_equal(i, ref_i) and np.array_equal(j, ref_j)
        sizes = [p[0].size for p in parts]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ConfigError):
        tiles.tile_range(5, 3, 3)


def test_one_tile_equals_three_tiles(small_set):
    intens, support = small_set
    averages = averages_dict(intens, support)
    params = PolarParams(n_angles=60, r_min=2.5)
    whole = compute_matrix(averages, params, progress=False)
    parts = [compute_tile(averages, params, k, 3, batch_pairs=2, progress=False)
             for k in range(3)]
    merged = tiles.merge_tiles(parts[::-1])
    np.testing.assert_allclose(merged["cc"], whole["cc"], rtol=0, atol=1e-12)
    assert np.array_equal(merged["angles"], whole["angles"])
    cc = whole["cc"]
    assert np.array_equal(cc, cc.T) and np.all(np.diag(cc) == 1.0)
    assert np.array_equal(whole["angles"], whole["angles"][:, :, ::-1].transpose(1, 0, 2))
    assert np.all((whole["angles"] >= 0) & (whole["angles"] < np.pi))


def test_merge_refuses_missing_duplicated_and_foreign_tiles(small_set, tmp_path):
    intens, support = small_set
    params = PolarParams(n_angles=30, r_min=2.5)
    averages = averages_dict(intens, support)
    parts = [compute_tile(averages, params, k, 3, progress=False) for k in range(3)]
    for k, part in enumerate(parts):
        part["path"] = f"tile{k}.h5"
    with pytest.raises(InputError, match="tile 1 of 3 is missing"):
        tiles.merge_tiles([parts[0], parts[2]])
    with pytest.raises(InputError, match="tile 2 given twice") as err:
        tiles.merge_tiles(parts + [dict(parts[2], path="copy.h5")])
    assert "copy.h5" in str(err.value)
    other = averages_dict(intens * 1.01, support)
    foreign = compute_tile(other, params, 1, 3, progress=False)
    foreign["path"] = "other/tile1.h5"
    for order in ([parts[0], foreign, parts[2]], [foreign, parts[0], parts[2]]):
        with pytest.raises(InputError, match="comes from different averages") as err:
            tiles.merge_tiles(order)
        assert str(err.value).startswith("other/tile1.h5:") and "\n" not in str(err.value)
    changed = compute_tile(averages, PolarParams(n_angles=30, r_min=2.5, transform="none"), 1, 3,
                           progress=False)
    with pytest.raises(InputError, match="different transform"):
        tiles.merge_tiles([parts[0], changed, parts[2]])


def test_nan_and_bad_averages_are_refused(tmp_path, small_set):
    intens, support = small_set
    bad = intens.copy()
    bad[3, 10, 12] = np.nan
    path = write_averages(tmp_path / "nan.h5", bad, support)
    with pytest.raises(InputError, match="NaN") as err:
        pairable_averages(path)
    assert str(path) in str(err.value) and "average 3" in str(err.value)
    one = write_averages(tmp_path / "one.h5", intens[:1], support)
    with pytest.raises(InputError, match="at least 2"):
        pairable_averages(one)


# ----------------------------------------------------------------------------- CLI
def test_cli_tiles_merge_and_whole_matrix(tmp_path, small_set, capsys):
    intens, support = small_set
    path = write_averages(tmp_path / "averages.h5", intens, support)
    common = ["--averages", str(path), "--n-angles", "40", "--r-min", "2.5", "--device", "cpu"]
    tile_paths = []
    for k in range(2):
        out = tmp_path / "commonlines" / f"tile{k}.h5"
        assert cli.main(["commonlines", *common, "--out", str(out), "--tile", str(k),
                         "--num-tiles", "2"]) == 0
        tile_paths.append(str(out))
    merged_path, figure = tmp_path / "commonlines.h5", tmp_path / "cc.png"
    assert cli.main(["merge-commonlines", "--tiles", *tile_paths, "--out", str(merged_path),
                     "--figure", str(figure)]) == 0
    whole_path = tmp_path / "whole.h5"
    assert cli.main(["commonlines", *common, "--out", str(whole_path)]) == 0
    with h5py.File(merged_path, "r") as f, h5py.File(whole_path, "r") as g:
        assert f["cc"].shape == (7, 7) and f["angles"].shape == (7, 7, 2)
        np.testing.assert_allclose(f["cc"][()], g["cc"][()], atol=1e-12)
        assert f.attrs["n_angles"] == 40 and f.attrs["transform"] == "log"
        assert f.attrs["averages_sha256"] == g.attrs["averages_sha256"]
        assert np.array_equal(f["replicate"][()], np.arange(7) % 2)
    assert figure.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    capsys.readouterr()
    # a missing tile: exit 2, one line naming it
    assert cli.main(["merge-commonlines", "--tiles", tile_paths[0], "--out",
                     str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "spiscape merge-commonlines: error: tile 1 of 2 is missing"
    # NaN input: exit 2 naming the file, nothing written
    bad = intens.copy()
    bad[0, 5, 5] = np.nan
    nan_path = write_averages(tmp_path / "nan.h5", bad, support)
    assert cli.main(["commonlines", "--averages", str(nan_path), "--out",
                     str(tmp_path / "nan_cl.h5")]) == 2
    assert str(nan_path) in capsys.readouterr().err
    assert not (tmp_path / "nan_cl.h5").exists()
    assert cli.main(["commonlines", *common, "--out", str(tmp_path / "y.h5"),
                     "--num-tiles", "3"]) == 2
    assert cli.main(["commonlines", *common, "--out", str(tmp_path / "y.h5"),
                     "--r-max", "big"]) == 2


@pytest.mark.gpu
def test_gpu_path_matches_numpy(cupy, small_set):
    intens, support = small_set
    averages = averages_dict(intens, support)
    for params in (PolarParams(n_angles=60, r_min=2.5),
                   PolarParams(n_angles=60, r_min=2.5, missing="overlap"),
                   PolarParams(n_angles=60, r_min=2.5, scale_range=0.15)):
        cpu = compute_matrix(averages, params, device="cpu", progress=False)
        gpu = compute_matrix(averages, params, device="gpu", batch_pairs=5, progress=False)
        np.testing.assert_allclose(gpu["cc"], cpu["cc"], atol=1e-10)
        np.testing.assert_allclose(gpu["scales"], cpu["scales"])


# ----------------------------------------------------------------------------- size search
def sphere_and_cube_sizes():
    """Slices of spheres of diameters 49..55 nm (±6 %), of a 42 nm cube at three orientations."""
    spheres = [central_slice(np.eye(3), lambda q, d=d: sphere(q, d)) for d in (49.0, 52.0, 55.0)]
    cubes = [central_slice(rotation((1, 2, 3), a), cube) for a in (0.0, 35.0, 70.0)]
    return np.array(spheres + cubes), annulus()


def test_scale_factors_are_geometric_symmetric_and_fine_enough():
    from spiscape.commonlines.polar import SCALE_SHIFT_PX, scale_factors

    s = scale_factors(0.15, 28.0)
    assert np.isclose(s[0] * s[-1], 1.0) and np.isclose(s[-1], 1.15) and 1.0 in s
    assert np.all(np.diff(np.log(s)) * 28.0 <= SCALE_SHIFT_PX / 1.0 + 1e-12)
    assert np.array_equal(scale_factors(0.0, 28.0), [1.0])


def test_size_search_joins_a_size_spread_and_keeps_shapes_apart():
    intens, support = sphere_and_cube_sizes()
    averages = averages_dict(intens, support)
    plain = compute_matrix(averages, PolarParams(n_angles=60), progress=False)
    sized = compute_matrix(averages, PolarParams(n_angles=60, scale_range=0.15), progress=False)
    # spheres of 49 and 55 nm: their fringes drift apart, unless one is scaled onto the other
    assert plain["cc"][0, 2] < 0.97 and sized["cc"][0, 2] > 0.995
    # the best scale is the size ratio: j's features lie at s times i's radii, size_j = size_i / s
    assert sized["scales"][0, 2] == pytest.approx(49.0 / 55.0, abs=0.02)
    assert sized["scales"][2, 0] == pytest.approx(1.0 / sized["scales"][0, 2])
    # a sphere and a cube do not become alike: every sphere-cube pair stays below the spheres
    assert sized["cc"][:3, 3:].max() < sized["cc"][:3, :3][np.triu_indices(3, 1)].min() - 0.01
    # the search never lowers a CC (s = 1 is one of the scales); without it the scales are 1
    assert np.all(sized["cc"] >= plain["cc"] - 1e-9) and np.all(plain["scales"] == 1.0)


def test_size_search_needs_the_one_product_layout():
    with pytest.raises(ConfigError, match="scale_range"):
        PolarParams(scale_range=0.1, lines="diameter")
    with pytest.raises(ConfigError, match="scale_range"):
        PolarParams(scale_range=0.1, missing="overlap")
    with pytest.raises(ConfigError, match="scale_range"):
        PolarParams(scale_range=1.0)


def test_size_search_tiles_merge_and_older_tiles_read(small_set, tmp_path):
    from spiscape.io.commonlines import read_tile, write_tile

    intens, support = small_set
    averages = averages_dict(intens, support)
    params = PolarParams(n_angles=60, r_min=2.5, scale_range=0.1)
    whole = compute_matrix(averages, params, progress=False)
    parts = [compute_tile(averages, params, k, 2, progress=False) for k in range(2)]
    merged = tiles.merge_tiles(parts)
    np.testing.assert_allclose(merged["cc"], whole["cc"], atol=1e-12)
    np.testing.assert_allclose(merged["scales"] * merged["scales"].T, 1.0)
    # a tile written before the size search existed has no 'scale': it reads as 1
    path = tmp_path / "tile0.h5"
    write_tile(path, parts[0], parts[0]["attrs"], parts[0]["replicate"], parts[0]["class"])
    with h5py.File(path, "a") as f:
        del f["scale"]
    assert np.all(read_tile(path)["scale"] == 1.0)
    # tiles of another size search are refused by name
    other = compute_tile(averages, PolarParams(n_angles=60, r_min=2.5), 1, 2, progress=False)
    with pytest.raises(InputError, match="scale_range"):
        tiles.merge_tiles([parts[0], other, parts[1]][:2] + [other])


def test_a_population_with_a_size_spread_is_kept_whole():
    """Spheres of 47..57 nm (±10 %), cubes and flat rods at random orientations, each average
    with its own photon level: the default landscape (size search, noise correction, k-means
    with the silhouette's k) finds the three shapes; without the size search the spheres split."""
    from sklearn.metrics import adjusted_rand_score

    from spiscape.commonlines.polar import SCALE_RANGE
    from spiscape.embed import clustering
    from spiscape.embed.embedding import NOISE_NEIGHBOURS, embed

    rng = np.random.default_rng(2)
    images = [central_slice(np.eye(3), lambda q, d=d: sphere(q, d))
              for d in np.linspace(47.0, 57.0, 8)]
    images += [central_slice(r, cube) for r in quaternion_to_matrix(rng.normal(size=(8, 4)))]
    images += [central_slice(r, lambda q: cube_form_factor(q * np.array([1.0, 1.0, 0.3]), 30.0))
               for r in quaternion_to_matrix(rng.normal(size=(6, 4)))]
    truth = np.repeat([0, 1, 2], [8, 8, 6])
    images = np.array(images)
    photons = rng.uniform(1e4, 2.5e5, truth.size)[:, None, None]
    images = rng.poisson(images / images.max(axis=(1, 2), keepdims=True) * photons) / photons
    support = annulus()
    averages = averages_dict(np.where(support, images, 0.0), support)
    scores = {}
    for scale_range in (0.0, SCALE_RANGE):
        cc = compute_matrix(averages, PolarParams(scale_range=scale_range), progress=False)["cc"]
        coords = embed(cc, "pca", 3, noise_neighbours=NOISE_NEIGHBOURS).coords
        labels = clustering.cluster(coords, "kmeans", "auto", 1).labels
        scores[scale_range] = adjusted_rand_score(truth, labels)
    assert scores[SCALE_RANGE] == 1.0 and scores[0.0] < 0.9, scores
