"""The simulator's physics on tiny arrays: form factors, volumes, geometry, orientations, noise."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from spiscape.errors import ConfigError
from spiscape.simulate import detector as geom
from spiscape.simulate import frames as fr
from spiscape.simulate import intensity as it
from spiscape.simulate import shapes as sh
from spiscape.simulate.run import SimulationParams, check_grid_covers

N = 48  # grid of the form-factor tests; voxel = 1 nm, so q is in cycles per N nm


def radial_profile(volume):
    k = it.grid_frequencies(volume.shape[0])
    kk = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    bins = np.rint(kk).astype(int).ravel()
    keep = bins < volume.shape[0] // 2
    return np.bincount(bins[keep], volume.ravel()[keep]) / np.bincount(bins[keep])


def first_local_minimum(values):
    inner = np.flatnonzero((values[1:-1] < values[:-2]) & (values[1:-1] <= values[2:]))
    return int(inner[0]) + 1


def grid_q():
    k = it.grid_frequencies(N)
    return np.stack(np.meshgrid(k, k, k, indexing="ij"), axis=-1) / N  # 1/nm


@pytest.mark.parametrize("refined", [False, True])
def test_sphere_intensity_matches_form_factor(refined):
    radius = 7.5
    if refined:  # the simulator's path: 4x finer real-space grid, DFT onto the q grid
        density = sh.sphere_density(2 * radius, 4 * N, 0.25, full=False)
        intens = it.intensity_on_grid(density, 0.25, 1.0 / N, N, unit_voxel_nm=1)
    else:
        intens = it.fft_intensity(sh.sphere_density(2 * radius, N, 1.0))
    q = np.linalg.norm(grid_q(), axis=-1)
    analytic = (4 / 3 * np.pi * radius**3 * it.sphere_form_factor(q, radius)) ** 2
    measured, expected = radial_profile(intens), radial_profile(analytic)
    assert np.corrcoef(np.log(measured), np.log(expected))[0, 1] >= 0.99
    assert measured[0] == pytest.approx(expected[0], rel=0.01)  # forward scattering = volume^2
    k_min = 4.4934 / (2 * np.pi * radius) * N  # first zero of 3(sin x - x cos x)/x^3
    assert abs(first_local_minimum(measured) - k_min) <= 1.0


def test_cube_intensity_matches_sinc_product():
    edge = 11.3
    density = sh.cube_density(edge, 4 * N, 0.25, full=False)
    intens = it.intensity_on_grid(density, 0.25, 1.0 / N, N, unit_voxel_nm=1)
    analytic = (edge**3 * it.cube_form_factor(grid_q(), edge)) ** 2
    c = N // 2
    k = np.arange(c)
    lines = {
        "axis": (intens[c:, c, c], analytic[c:, c, c]),
        "face diagonal": (intens[c + k, c + k, c], analytic[c + k, c + k, c]),
        "body diagonal": (intens[c + k, c + k, c + k], analytic[c + k, c + k, c + k]),
    }
    for name, (measured, expected) in lines.items():
        keep = expected > expected.max() * 1e-8  # the exact zeros of the sinc have no log
        corr = np.corrcoef(np.log(measured[keep]), np.log(expected[keep]))[0, 1]
        assert corr >= 0.99, name
        # sinc(k a / N) vanishes first at k = N / a, on every line through the origin used here
        assert abs(first_local_minimum(measured) - N / edge) <= 1.0, name
    assert intens[c, c, c] == pytest.approx(edge**6, rel=1e-9)


def test_superball_volume_formula_matches_voxel_count():
    assert sh.superball_volume(3.0, 2.0) == pytest.approx(4 / 3 * np.pi * 27)
    assert sh.superball_volume(3.0, 400.0) == pytest.approx(216, rel=0.01)  # -> cube of edge 2r
    for p in (2.0, 4.5, 12.0):
        counted = sh.superball_density(9.3, p, 40, 1.0).sum()
        assert counted == pytest.approx(sh.superball_volume(9.3, p), rel=0.005)


def test_melting_series_grows_volume_by_ten_percent():
    a = 16.0
    assert sh.superball_exponent(0.0, 12.0) == pytest.approx(12.0)
    assert sh.superball_exponent(1.0, 12.0) == pytest.approx(2.0)
    assert 1 / sh.superball_exponent(0.5, 12.0) == pytest.approx((1 / 12 + 1 / 2) / 2)
    t = np.linspace(0, 1, 5)
    r = sh.melting_radius(t, a, 12.0, 0.10)
    p = sh.superball_exponent(t, 12.0)
    assert sh.superball_volume(r, p) == pytest.approx(a**3 * (1 + 0.10 * t))
    counted = [sh.superball_density(ri, pi, 40, 1.0).sum() for ri, pi in zip(r, p, strict=True)]
    assert counted[-1] / counted[0] == pytest.approx(1.10, abs=0.01)
    assert np.all(np.diff(counted) > 0)


def test_contaminant_volumes():
    dimer = sh.dimer_density(10.0, 48, 1.0)
    assert dimer.sum() == pytest.approx(2 * np.pi / 6 * 1000, rel=0.01)
    rod = sh.rod_density(30.0, 8.0, 48, 1.0)
    assert rod.sum() == pytest.approx(np.pi * 16 * 30, rel=0.01)
    with pytest.raises(ConfigError, match="does not fit"):
        sh.rod_density(60.0, 8.0, 48, 1.0)


def test_intensities_are_friedel_symmetric():
    rng = np.random.default_rng(0)
    density = np.zeros((16, 16, 16))
    density[5:11, 6:9, 4:12] = rng.random((6, 3, 8))  # no symmetry at all
    for intens in (it.fft_intensity(density), it.intensity_on_grid(density, 1.0, 1 / 16, 16)):
        inner = intens[1:, 1:, 1:]  # index 0 is q = -N/2, whose partner lies off the grid
        np.testing.assert_allclose(inner, inner[::-1, ::-1, ::-1], rtol=1e-9)


def test_dft_on_grid_equals_fft():
    density = sh.superball_density(6.0, 4.0, 24, 1.0)
    density[9, 10, 14] += 0.3  # asymmetric: exercises the complex path too
    for dens in (density, sh.superball_density(6.0, 4.0, 24, 1.0)):
        np.testing.assert_allclose(
            it.intensity_on_grid(dens, 1.0, 1 / 24, 24), it.fft_intensity(dens),
            rtol=1e-9, atol=1e-9 * it.fft_intensity(dens).max(),
        )


def test_size_scaling_is_analytic():
    # a sphere of radius s R has I_s(q) = s^6 I(s q); the simulator uses this for size spreads
    q = np.linspace(0, 0.2, 50)
    s, radius = 1.07, 6.0
    big = (4 / 3 * np.pi * (s * radius) ** 3 * it.sphere_form_factor(q, s * radius)) ** 2
    base = (4 / 3 * np.pi * radius**3 * it.sphere_form_factor(s * q, radius)) ** 2
    np.testing.assert_allclose(big, s**6 * base, rtol=1e-12)


def test_spherical_average_of_isotropic_function():
    k = it.grid_frequencies(32)
    kk = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    volume = np.exp(-(kk**2) / 50.0)
    radii = np.array([0.0, 2.0, 5.5, 10.0])
    np.testing.assert_allclose(
        it.spherical_average(volume, radii), np.exp(-(radii**2) / 50.0), rtol=0.01, atol=1e-3
    )


# ------------------------------------------------------------------------------------------
# detector geometry


@pytest.fixture(scope="module")
def detector():
    return geom.make_detector(binning=8, beamstop_px=2, gap_px=1)


def test_reference_geometry_numbers():
    assert geom.wavelength_nm(6.0) == pytest.approx(0.20664, rel=1e-4)
    dq = geom.q_per_voxel_inv_nm(705, 200, 6.0, 4)
    assert dq == pytest.approx(0.8 / (0.20664 * 705), rel=1e-4)
    assert geom.real_space_voxel_nm(64, distance_mm=705, pixel_um=200, energy_kev=6.0,
                                    binning=4) == pytest.approx(1 / (64 * dq))
    det = geom.make_detector()  # the default dataset: binning 4 -> 57 x 57
    assert geom.detector_side(det) == 57
    assert det.detd == det.ewald_rad == pytest.approx(705e3 / 800)


def test_ewald_curvature(detector):
    det = detector
    centre = np.argmin(det.qx**2 + det.qy**2)
    assert det.qz[centre] == 0 and det.corr[centre] == pytest.approx(1.0)
    off = np.arange(det.num_pix) != centre
    assert np.all(det.qz[off] < 0)
    # |q| = 2 sin(theta) / lambda in voxels of dq = pixel / (lambda D)
    cx, cy = det.coords_2d()
    two_theta = np.arctan(np.hypot(cx, cy) / det.detd)
    dq = geom.q_per_voxel_inv_nm(705, 200, 6.0, 8)
    expected = 2 * np.sin(two_theta / 2) / geom.wavelength_nm(6.0) / dq
    np.testing.assert_allclose(geom.q_magnitude(det), expected, rtol=1e-9, atol=1e-9)
    assert np.all(det.corr <= 1.0) and np.all(det.corr > 0.9)


def test_mask_layout(detector):
    det = detector
    side = geom.detector_side(det)
    mask = det.mask.reshape(side, side)
    c = side // 2
    assert mask[c, c] == 2  # beamstop
    r_max = det.detd * np.tan(np.deg2rad(1.8))
    cx, cy = det.coords_2d()
    radius = np.hypot(cx, cy)
    assert np.all(det.mask[(radius > r_max)] >= 1)  # corners: merged only
    assert np.all(det.mask[(radius <= r_max) & (radius > 2) & (np.abs(cy) > 6)] == 0)
    gap_rows = np.flatnonzero(np.all(mask == 2, axis=1))
    assert gap_rows.size == 1 and gap_rows[0] != c
    assert not np.array_equal(mask, mask[::-1, :])  # the gap breaks the up-down symmetry


def test_polarisation(detector):
    det = detector
    cx, cy = det.coords_2d()
    left, up = np.argmin(np.abs(cx + 10) + np.abs(cy)), np.argmin(np.abs(cx) + np.abs(cy + 10))
    assert det.corr[left] < det.corr[up]  # x-polarised: weaker along x


def test_grid_must_cover_the_detector(detector):
    det = geom.make_detector(binning=8)
    with pytest.raises(ConfigError, match="grid_size"):
        check_grid_covers(det, 24, 1.0)
    dropped = check_grid_covers(det, 30, 1.0)  # reaches the circle but not all corners
    assert dropped > 0 and np.all(det.mask[geom.q_magnitude(det) > 14] == 2)


# ------------------------------------------------------------------------------------------
# orientations, slicing, photons


def test_orientations_are_uniform():
    quats = fr.random_quaternions(20000, np.random.default_rng(3))
    np.testing.assert_allclose(np.linalg.norm(quats, axis=1), 1.0)
    assert np.all(quats[:, 0] >= 0)
    omega = 2 * np.arccos(np.clip(quats[:, 0], -1, 1))
    # the rotation angle of uniform rotations has density (1 - cos w) / pi on [0, pi]
    ks = stats.kstest(omega, lambda w: (w - np.sin(w)) / np.pi)
    assert ks.pvalue > 0.001
    axis = fr.quaternion_to_matrix(quats) @ np.array([0.0, 0.0, 1.0])
    assert np.all(np.abs(axis.mean(axis=0)) < 0.03)


def test_quaternion_convention_rotates_detector_q():
    c45 = np.sqrt(0.5)
    rot = fr.quaternion_to_matrix(np.array([[c45, 0.0, 0.0, c45]]))  # 90 degrees about z
    np.testing.assert_allclose(rot[0] @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-12)
    volume = np.zeros((16, 16, 16))
    volume[8 + 5, 8, 8] = 1.0  # a bright voxel at q = (5, 0, 0)
    q = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, -5.0, 0.0]]).T  # three "pixels"
    sliced = fr.slice_volume(volume, q, rot)
    # frame d samples I(R_d q_t): R maps (0, -5, 0) onto (5, 0, 0)
    np.testing.assert_allclose(sliced, [[0.0, 0.0, 1.0]])


def test_size_factor_samples_scaled_q():
    volume = np.zeros((16, 16, 16))
    volume[8 + 6, 8, 8] = 1.0
    q = np.array([[3.0], [0.0], [0.0]])
    out = fr.slice_volume(volume, q, np.eye(3)[None], sizes=np.array([2.0]))
    assert out[0, 0] == 1.0


def test_photon_counts_are_poisson():
    rng = np.random.default_rng(5)
    volume = np.exp(-np.sum(np.meshgrid(*[it.grid_frequencies(16)] * 3, indexing="ij"), 0) ** 2
                    / 30.0) * 3.0
    q = np.stack([rng.uniform(-4, 4, 60), rng.uniform(-4, 4, 60), np.zeros(60)])
    n = 4000
    rotations = np.repeat(np.eye(3)[None], n, axis=0)  # same orientation, fixed fluence
    lam = fr.expected_photons(volume, q, np.ones(60), rotations, np.ones(n), np.ones(n))
    counts = fr.sample_photons(lam, rng)
    mean, var = counts.mean(axis=0), counts.var(axis=0, ddof=1)
    keep = lam[0] > 0.2
    np.testing.assert_allclose(mean[keep], lam[0, keep], rtol=0.1, atol=0.05)
    dispersion = var[keep] / mean[keep]
    assert abs(dispersion.mean() - 1.0) < 0.03  # Poisson: variance = mean
    # chunking the draws does not change them
    again = np.concatenate([fr.sample_photons(lam[:1000], r := np.random.default_rng(5)),
                            fr.sample_photons(lam[1000:], r)])
    rng2 = np.random.default_rng(5)
    np.testing.assert_array_equal(again, fr.sample_photons(lam, rng2))


def test_fluence_is_gamma_with_mean_one():
    phi = fr.fluence_factors(20000, 4.0, np.random.default_rng(1))
    assert phi.mean() == pytest.approx(1.0, abs=0.02)
    assert phi.std() == pytest.approx(0.5, abs=0.02)
    assert np.all(fr.fluence_factors(10, 0.0, np.random.default_rng(1)) == 1.0)


# ------------------------------------------------------------------------------------------
# parameters


def test_params_reject_unknown_and_impossible_values():
    with pytest.raises(ConfigError, match="num_framez"):
        SimulationParams.from_dict({"num_framez": 10})
    with pytest.raises(ConfigError, match="sum to 1.7"):
        SimulationParams.from_dict({"fractions": {"cube": 0.9, "sphere": 0.8}})
    with pytest.raises(ConfigError, match="mean_photons"):
        SimulationParams.from_dict({"mean_photons": -1})
    with pytest.raises(ConfigError, match="unknown population"):
        SimulationParams.from_dict({"fractions": {"cube": 0.5, "pyramid": 0.5}})
    with pytest.raises(ConfigError, match="integer"):
        SimulationParams.from_dict({"num_frames": 10.5})
    params = SimulationParams.from_dict({"num_frames": 10, "fractions": {"cube": 1}})
    assert params.fractions == {"cube": 1.0, "melting": 0.0, "sphere": 0.0, "dimer": 0.0,
                                "rod": 0.0}
    assert params.max_size_factor() == pytest.approx(1 + 3 * params.cube_edge_spread)
