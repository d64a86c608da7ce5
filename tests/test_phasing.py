"""Phase retrieval: recipes, alignment, recovery of known objects, particle volumes, the CLI."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest

from spiscape import cli
from spiscape.errors import ConfigError
from spiscape.phasing import (
    DEFAULT_RECIPE,
    PhasingParams,
    measured_shell_mask,
    parse_recipe,
    phase_pattern,
)
from spiscape.phasing.align import align_starts
from spiscape.phasing.volume import particle_volume_nm3
from spiscape.simulate.intensity import fft_intensity
from spiscape.simulate.shapes import cube_density, sphere_density


def intensity_2d(density):
    return np.abs(np.fft.fftshift(np.fft.fftn(density))) ** 2


def aligned_cc(truth, density):
    """Correlation after aligning ``density`` to ``truth`` (shift and inversion)."""
    both = np.stack([truth, density]).astype(np.float32)
    aligned = align_starts(np, both)[0]
    return float(np.corrcoef(aligned[0].ravel(), aligned[1].ravel())[0, 1])


def test_parse_recipe():
    assert parse_recipe("100 DM 50 er") == [(100, "DM"), (50, "ER")]
    assert parse_recipe("200 RAAR, 100 HIO 50 ER")[1] == (100, "HIO")
    for bad, match in [("", "empty"), ("100 DM 50", "pairs"), ("DM 100", "iteration count"),
                       ("0 ER", "iteration count"), ("10 XYZ", "unknown algorithm")]:
        with pytest.raises(ConfigError, match=match):
            parse_recipe(bad)


def test_alignment_undoes_shift_and_inversion():
    rng = np.random.default_rng(0)
    obj = np.zeros((24, 24, 24), np.float32)
    obj[8:14, 9:13, 10:17] = rng.random((6, 4, 7)) + 0.5
    moved = np.roll(obj[::-1, ::-1, ::-1], (3, -5, 2), axis=(0, 1, 2))
    aligned, _, shifts, inverted = align_starts(np, np.stack([obj, moved]))
    assert list(inverted) == [False, True]
    assert np.allclose(aligned[1], obj, atol=1e-4)


@pytest.mark.parametrize("recipe", ["200 HIO 50 ER", "200 DM 50 ER", "200 RAAR 50 ER"])
def test_recovers_2d_object(recipe):
    n = 48
    obj = np.zeros((n, n))
    yy, xx = np.mgrid[:n, :n] - n // 2
    obj[(np.abs(yy) <= 6) & (np.abs(xx + 2) <= 4)] = 1.0
    obj[(yy - 3) ** 2 + (xx - 5) ** 2 <= 16] = 2.0  # asymmetric: the twin is a real ambiguity
    measured = measured_shell_mask((n, n), 2, 20)
    res = phase_pattern(intensity_2d(obj), PhasingParams(recipe=recipe, starts=4, seed=3),
                        measured=measured)
    errors = res.errors.mean(axis=1)
    assert errors[-1] < 0.5 * errors[:5].max()
    assert aligned_cc(obj, res.density) >= 0.9


def test_recovers_3d_object_and_prtf():
    n = 32
    obj = cube_density(8.0, n, 1.0)
    obj = np.roll(obj, 2, axis=0) + 0.5 * np.roll(sphere_density(5.0, n, 1.0), (-3, 3), (1, 2))
    measured = measured_shell_mask(obj.shape, 2, 13)
    res = phase_pattern(fft_intensity(obj, box_average=False),
                        PhasingParams(recipe="40 DM 40 RAAR 40 ER", starts=3), measured=measured)
    assert res.errors[-1].max() < 0.05
    assert aligned_cc(obj, res.density) >= 0.9
    assert res.prtf.shape == res.prtf_q.shape and np.nanmin(res.prtf[2:8]) > 0.8


def test_starts_must_agree_or_more_are_phased():
    """A result is trusted when two starts agree; starts that did not converge (3 ER
    iterations from random phases) never agree, so more batches are phased, up to max_rounds,
    and the result says it did not converge."""
    from spiscape.phasing import agreeing

    n = 32
    obj = cube_density(8.0, n, 1.0)
    obj = np.roll(obj, 2, axis=0) + 0.5 * np.roll(sphere_density(5.0, n, 1.0), (-3, 3), (1, 2))
    intens = fft_intensity(obj, box_average=False)
    measured = measured_shell_mask(obj.shape, 2, 13)
    good = phase_pattern(intens, PhasingParams(recipe="40 DM 40 RAAR 40 ER", starts=3),
                         measured=measured)
    assert good.converged and good.rounds == 1 and good.kept.size >= 2
    assert good.errors.shape[1] == 3
    bad = phase_pattern(intens, PhasingParams(recipe="3 ER", starts=2, max_rounds=3),
                        measured=measured)
    assert not bad.converged and bad.rounds == 3
    assert bad.errors.shape[1] == 6 and bad.kept.size == 1
    one = phase_pattern(intens, PhasingParams(recipe="3 ER", starts=2, min_agree=1),
                        measured=measured)
    assert one.converged and one.rounds == 1
    # the agreement test itself: a copy agrees, noise does not
    rng = np.random.default_rng(0)
    stack = np.stack([obj, obj * 2 + 0.01 * rng.standard_normal(obj.shape),
                      rng.standard_normal(obj.shape)])
    assert agreeing(np, stack, 0.8).tolist() == [True, True, False]


def _phased_volume(intens, rule, n=48, q_max=21, recipe="60 DM 60 RAAR 60 ER", starts=3):
    measured = measured_shell_mask(intens.shape, 3, q_max)
    res = phase_pattern(intens, PhasingParams(recipe=recipe, starts=starts), measured=measured)
    # voxel 1 nm
    return particle_volume_nm3(res.signed_density, 1.0 / n, rule, intens=intens, measured=measured)


EDGE = 12.0
DIAMETER = (6 * 1.10 * EDGE**3 / np.pi) ** (1 / 3)


def test_volume_ratio_sphere_cube_integrated():
    """The voxelised shapes' intensities (partial volumes at the edges), the ``integrated`` rule."""
    cube = _phased_volume(fft_intensity(cube_density(EDGE, 48, 1.0), box_average=True),
                          "integrated")
    sphere = _phased_volume(fft_intensity(sphere_density(DIAMETER, 48, 1.0, supersample=4),
                                          box_average=True), "integrated")
    assert cube == pytest.approx(EDGE**3, rel=0.05)
    assert sphere == pytest.approx(1.10 * EDGE**3, rel=0.05)
    assert sphere / cube == pytest.approx(1.10, rel=0.03)


def analytic_intensities(n=48, spread=0.0, samples=41):
    """|F|^2 of a sharp cube (edge EDGE) and sphere (1.10 x its volume) on the n^3 grid (q in
    1/voxel), from the form factors; with a Gaussian size spread, the mean of s^6 I(s q)."""
    from spiscape.simulate.intensity import cube_form_factor, sphere_form_factor

    ax = (np.arange(n) - n // 2) / n
    q = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1)
    qn = np.linalg.norm(q, axis=-1)
    scales = np.array([1.0]) if not spread else 1.0 + spread * np.linspace(-2.5, 2.5, samples)
    weights = np.exp(-0.5 * ((scales - 1.0) / (spread or 1.0)) ** 2)
    cube = sum(w * (EDGE**3 * s**3 * cube_form_factor(q, s * EDGE)) ** 2
               for s, w in zip(scales, weights, strict=True)) / weights.sum()
    sphere = sum(w * (np.pi / 6 * (s * DIAMETER) ** 3 * sphere_form_factor(qn, s * DIAMETER / 2))
                 ** 2 for s, w in zip(scales, weights, strict=True)) / weights.sum()
    return cube, sphere


def test_porod_volume_of_sharp_cube_and_sphere():
    cube_i, sphere_i = analytic_intensities()
    cube, sphere = _phased_volume(cube_i, "porod"), _phased_volume(sphere_i, "porod")
    assert cube == pytest.approx(EDGE**3, rel=0.03)
    assert sphere == pytest.approx(1.10 * EDGE**3, rel=0.03)
    assert sphere / cube == pytest.approx(1.10, rel=0.02)


def test_porod_volume_survives_a_size_spread():
    """Intensities averaged over a 3 % size spread (fringe minima filled: no single object has
    them) still give the volumes, and their ratio, from the Porod rule."""
    cube_i, sphere_i = analytic_intensities(spread=0.03)
    # the default recipe: 180 iterations leave the blurred sphere unconverged (error 0.05-0.08)
    cube, sphere = (_phased_volume(i, "porod", recipe=DEFAULT_RECIPE, starts=4)
                    for i in (cube_i, sphere_i))
    assert cube == pytest.approx(EDGE**3, rel=0.08)
    assert sphere == pytest.approx(1.10 * EDGE**3, rel=0.08)
    assert sphere / cube == pytest.approx(1.10, rel=0.03)


def test_porod_volume_of_a_blurred_particle_corrects_the_envelope():
    """The analytic sphere seen through a Gaussian envelope exp(-s^2 q^2) (a low-pass of the
    density, as Dragonfly's simulator applies, or a detector's point spread): the envelope read
    off the outer shells is the one applied, and the corrected Porod volume is the particle's,
    where the plain one reads it larger."""
    from spiscape.phasing.volume import porod_envelope, porod_voxels

    n, q_max = 48, 21
    _, sphere_i = analytic_intensities()
    measured = measured_shell_mask(sphere_i.shape, 3, q_max)
    r = np.linalg.norm(np.indices(sphere_i.shape) - n // 2, axis=0)
    s2 = (1.0 / 15.0) ** 2  # the intensity at the detector's edge falls to 14 %
    blurred = sphere_i * np.exp(-s2 * r ** 2)
    assert porod_envelope(blurred, measured, r, q_max) == pytest.approx(s2, rel=0.25)
    assert porod_envelope(sphere_i, measured, r, q_max) < 0.1 * s2  # sharp: nothing to undo
    res = phase_pattern(blurred, PhasingParams(recipe="60 DM 60 RAAR 60 ER", starts=3),
                        measured=measured)
    true = 1.10 * EDGE**3  # voxel 1 nm
    plain = porod_voxels(res.signed_density, blurred, measured, envelope=False)["voxels"]
    corrected = porod_voxels(res.signed_density, blurred, measured)["voxels"]
    assert plain > 1.08 * true
    assert corrected == pytest.approx(true, rel=0.04)


def test_shared_envelope_is_the_curves_and_serves_each_volume():
    """A curve whose volumes share one blur, one of them also falling faster at high q (what a
    shape or a partial fringe does to one volume's own estimate): the curve's envelope is the
    common blur, and each volume's Porod reading uses it."""
    from spiscape.phasing.volume import porod_envelope, porod_voxels, shared_envelope

    n, q_max = 48, 21
    _, sphere_i = analytic_intensities()
    measured = measured_shell_mask(sphere_i.shape, 3, q_max)
    r = np.linalg.norm(np.indices(sphere_i.shape) - n // 2, axis=0)
    s2 = (1.0 / 15.0) ** 2
    blurred = sphere_i * np.exp(-s2 * r ** 2)
    steeper = sphere_i * np.exp(-3 * s2 * r ** 2)
    curve = np.stack([steeper, blurred, np.where(measured, blurred, np.nan)])
    shared = shared_envelope(curve, measured)
    assert shared == pytest.approx(porod_envelope(blurred, measured, r, q_max))
    assert shared == pytest.approx(s2, rel=0.25)
    density = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(np.sqrt(steeper)))).real
    used = porod_voxels(density, steeper, measured, envelope_s2=shared)
    assert used["envelope_s2"] == shared
    assert porod_voxels(density, steeper, measured)["envelope_s2"] > 2 * shared
    with pytest.raises(ConfigError, match="s\\^2"):
        porod_voxels(density, steeper, measured, envelope_s2=-1.0)
    with pytest.raises(ConfigError, match="stack"):
        shared_envelope(blurred[0, 0], measured[0, 0])


def test_porod_volume_needs_intensities():
    with pytest.raises(ConfigError, match="porod"):
        particle_volume_nm3(np.ones((8, 8, 8)), 0.1, "porod")


def test_integrated_volume_is_shape_independent():
    """Band-limited (spherical q cut-off) cube and sphere: mass / smoothed plateau is exact,
    while the half-plateau threshold reads the small cube several per cent high."""
    n, edge = 48, 12.0
    measured = np.fft.ifftshift(measured_shell_mask((n,) * 3, 0, 21))
    cube = cube_density(edge, n, 1.0)
    diameter = (6 * 1.10 * edge**3 / np.pi) ** (1 / 3)
    sphere = sphere_density(diameter, n, 1.0, supersample=4)
    vols = {}
    for name, obj in (("cube", cube), ("sphere", sphere)):
        limited = np.fft.ifftn(np.fft.fftn(obj) * measured).real
        assert limited.min() < -0.01  # the cut-off rings below zero
        vols[name] = particle_volume_nm3(limited, 1.0 / n)
        assert vols[name] == pytest.approx(obj.sum(), rel=0.005)
    assert vols["sphere"] / vols["cube"] == pytest.approx(1.10, rel=0.01)


def test_cli_phase_volumes_and_errors(tmp_path, capsys):
    n = 24
    obj = cube_density(6.0, n, 1.0)
    intens = fft_intensity(obj, box_average=False).astype(np.float32)
    intens[~measured_shell_mask(intens.shape, 2, 10)] = np.nan
    src = tmp_path / "volumes.h5"
    with h5py.File(src, "w") as f:
        f["intens"] = np.stack([intens, intens * 4])
        f["z"] = np.array([[0.0], [1.0]])
        f["has_data"] = np.array([True, False])
        f.attrs["q_per_voxel_inv_nm"] = 1.0 / n
    out, curve = tmp_path / "phasing.h5", tmp_path / "curve.csv"
    code = cli.main(["phase", "--volumes", str(src), "--out", str(out), "--curve", str(curve),
                     "--recipe", "20 DM 20 ER", "--starts", "2", "--device", "cpu",
                     "--figure-dir", str(tmp_path / "fig")])
    assert code == 0
    with h5py.File(out) as f:
        assert f["density"].shape == (2, n, n, n) and f["support"].dtype == bool
        assert f["volume"].shape == (2,) and f["prtf"].shape[0] == 2
        assert f.attrs["recipe"] == "20 DM 20 ER"
        assert f["converged"].dtype == bool and f["starts_averaged"][()].min() >= 1
        assert f.attrs["porod_envelope_s2"] >= 0  # the curve's one envelope
        vol = f["volume"][()]
    assert vol[1] == pytest.approx(vol[0], rel=0.05)  # intensity scale does not change volume
    rows = list(csv.DictReader(open(curve)))
    assert len(rows) == 2 and float(rows[0]["volume_relative"]) == 1.0
    assert [r["has_data"] for r in rows] == ["1", "0"]
    assert {r["converged"] for r in rows} <= {"0", "1"}  # 2 starts of a 20-iteration recipe
    assert (tmp_path / "fig" / "volume_vs_latent.png").exists()

    # VAE volumes: the decoder's extrapolation beyond the measured q range is left free by default
    with h5py.File(src, "a") as f:
        f.attrs["q_min_measured"] = 2.5
        f.attrs["q_max_measured"] = 9.5
    for extra, limits in (([], (2.5, 9.5)), (["--q-min", "1", "--q-max", "11"], (1.0, 11.0))):
        assert cli.main(["phase", "--volumes", str(src), "--out", str(out), "--indices", "0",
                         "--recipe", "5 ER", "--starts", "1", "--device", "cpu", *extra]) == 0
        with h5py.File(out) as f:
            assert (f.attrs["q_min_voxels"], f.attrs["q_max_voxels"]) == limits

    assert cli.main(["phase", "--volumes", str(src), "--out", str(out),
                     "--recipe", "20 DM 7"]) == 2
    assert "recipe" in capsys.readouterr().err
    assert cli.main(["phase", "--volumes", str(tmp_path / "none.h5"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_phase_averages(tmp_path):
    n = 31
    obj = np.zeros((n, n))
    obj[12:19, 13:18] = 1.0
    intens = intensity_2d(obj)[None].astype(np.float32)
    src = tmp_path / "averages.h5"
    with h5py.File(src, "w") as f:
        f["intens"] = intens
        f["support"] = measured_shell_mask((n, n), 2, 14)
    out = tmp_path / "phasing2d.h5"
    assert cli.main(["phase", "--averages", str(src), "--out", str(out), "--recipe",
                     "30 HIO 30 ER", "--starts", "2", "--device", "cpu"]) == 0
    with h5py.File(out) as f:
        assert f["density"].shape == (1, n, n)


def test_stagnated_patterns_are_the_outliers_of_the_curve():
    """A batch of starts can stagnate alike (they agree, so the agreement rule passes) with a
    support error several times the curve's: those patterns are phased again (spiscape phase)."""
    from types import SimpleNamespace

    from spiscape.phasing.algorithms import final_error, stagnated

    def result(last_error):
        errors = np.array([[0.9, 0.9], [last_error, last_error + 0.02]])
        return SimpleNamespace(errors=errors, kept=np.array([0, 1]))

    curve = [result(e) for e in (0.10, 0.12, 0.39, 0.09, 0.11, 0.43)]
    assert final_error(curve[2]) == pytest.approx(0.40)
    assert stagnated(curve) == [2, 5]
    assert stagnated(curve[:2]) == []  # too few patterns to call one an outlier
    assert stagnated([result(0.1)] * 5) == []
    # most of a curve collapsed alike (df64 of the validation matrix: 6 of 11): still found,
    # where a rule on the median would have called the good ones normal and the rest too
    df64 = [result(e) for e in (0.10, 0.40, 0.10, 0.10, 0.11, 0.39, 0.21, 0.42, 0.40, 0.43,
                                0.42)]
    assert stagnated(df64) == [1, 5, 7, 8, 9, 10]  # 0.21 (half the volume) is just under


def test_retries_lower_the_shrinkwrap_threshold_and_change_the_seed():
    from spiscape.phasing.algorithms import PhasingParams, retry_params

    base = PhasingParams(seed=3)
    first, second = retry_params(base, 1), retry_params(base, 2)
    assert first.shrinkwrap_threshold == pytest.approx(base.shrinkwrap_threshold / 2)
    assert second.shrinkwrap_threshold_start == pytest.approx(
        base.shrinkwrap_threshold_start / 4)
    assert len({base.seed, first.seed, second.seed}) == 3


def test_an_outlier_reproduced_by_an_independent_phasing_is_a_solution():
    """A pattern whose support error stays an outlier after its retries is kept as converged
    when another phasing with other seeds lands on the same density (its intensities are not
    one object's, e.g. blurred fringes), not when the other phasing differs, did not converge
    itself, or the volume is outside a factor 2 of the curve's (a collapsed support)."""
    from types import SimpleNamespace

    from spiscape.phasing import densities_agree, reproduced
    from spiscape.phasing.algorithms import independent_params, retry_params

    n = 24
    cube = cube_density(6.0, n, 1.0)
    twin_shifted = np.roll(cube[::-1, ::-1, ::-1], (3, -2, 1), axis=(0, 1, 2))
    agree, cc = densities_agree(cube, twin_shifted, 0.8)
    assert agree and cc > 0.99
    other_shape = sphere_density(3.0, n, 1.0) + np.roll(sphere_density(3.0, n, 1.0), 8, axis=0)
    assert not densities_agree(cube, other_shape, 0.8)[0]

    def result(density, converged=True):
        return SimpleNamespace(density=density, converged=converged)

    first = result(cube)
    same, different = result(twin_shifted), result(other_shape)
    assert reproduced(first, [first, different, same], 100.0, 110.0, 0.8) > 0.99
    assert reproduced(first, [first, different], 100.0, 110.0, 0.8) is None
    assert reproduced(first, [first], 100.0, 110.0, 0.8) is None  # not against itself
    assert reproduced(first, [first, result(twin_shifted, False)], 100.0, 110.0, 0.8) is None
    assert reproduced(result(cube, False), [same], 100.0, 110.0, 0.8) is None
    assert reproduced(first, [same], 11.0, 110.0, 0.8) is None  # collapsed alike
    assert reproduced(first, [same], 100.0, float("nan"), 0.8) > 0.99
    base = PhasingParams(seed=3)
    check = independent_params(base)
    assert check.seed not in {base.seed} | {retry_params(base, a).seed for a in (1, 2, 3)}
    assert check.shrinkwrap_threshold == base.shrinkwrap_threshold


def test_a_retry_replaces_a_collapsed_result_not_a_sound_volume():
    from spiscape.phasing.algorithms import Phaser, PhasingParams, retry_replaces

    # why the errors alone cannot decide: a support grown around the same P_M rho always leaves
    # less of it outside, so the retry's lower shrink-wrap threshold buys a lower support error
    rng = np.random.default_rng(0)
    p = np.abs(rng.normal(size=(1, 12, 12, 12))).astype(np.float32)
    small = np.zeros((1, 12, 12, 12), dtype=bool)
    small[:, 3:9, 3:9, 3:9] = True
    grown = small.copy()
    grown[:, 2:10, 2:10, 2:10] = True
    phaser = Phaser(np.ones((12, 12, 12), dtype=np.float32), PhasingParams())
    assert phaser.support_error(p, grown)[0] < phaser.support_error(p, small)[0]
    typical = 70e3
    # a collapsed support (a tenth of the volume) is rescued by a retry near the curve's volume
    assert retry_replaces(0.40, 7e3, 0.09, 72e3, typical)
    # the validation matrix's spikes: a first result at the curve's volume with a high error,
    # a retry with a grown support, a lower error and a volume 20-50 % above: kept out
    assert not retry_replaces(0.087, 68.9e3, 0.074, 82.1e3, typical)  # df64
    assert not retry_replaces(0.13, 104.5e3, 0.11, 157.6e3, 110e3)  # df96low
    # a retry must lower the error, and stay within a factor 2 of the curve
    assert not retry_replaces(0.40, 7e3, 0.45, 70e3, typical)
    assert not retry_replaces(0.40, 7e3, 0.09, 150e3, typical)
    # no q scale (volumes NaN): the error alone decides
    assert retry_replaces(0.40, np.nan, 0.09, np.nan, np.nan)
    assert not retry_replaces(0.09, np.nan, 0.40, np.nan, np.nan)


def test_density_maps_read_back_with_their_physical_size(tmp_path):
    # a 10 nm sphere on a grid of 0.5 nm voxels (dq = 1 / (n 0.5 nm)), phased: its MRC maps say
    # 5 A per voxel, centre at the origin, and hold a particle 100 A across
    import mrcfile

    n, voxel_nm, diameter_nm = 48, 0.5, 10.0
    obj = sphere_density(diameter_nm / voxel_nm, n, 1.0)
    intens = fft_intensity(obj, box_average=False).astype(np.float32)
    src = tmp_path / "volumes.h5"
    with h5py.File(src, "w") as f:
        f["intens"] = np.stack([intens, intens])
        f["z"] = np.array([[-1.0], [1.0]])
        f.attrs["q_per_voxel_inv_nm"] = 1.0 / (n * voxel_nm)
    maps = tmp_path / "maps"
    assert cli.main(["phase", "--volumes", str(src), "--out", str(tmp_path / "p.h5"),
                     "--recipe", "50 RAAR 30 ER", "--starts", "1", "--device", "cpu",
                     "--mrc-dir", str(maps)]) == 0
    assert sorted(p.name for p in maps.iterdir()) == ["density_000.mrc", "density_001.mrc",
                                                     "z_values.txt"]
    np.testing.assert_allclose(np.loadtxt(maps / "z_values.txt"), [-1.0, 1.0])
    with mrcfile.open(maps / "density_001.mrc") as m:
        assert m.voxel_size.x == pytest.approx(10 * voxel_nm)
        origin = np.array([m.header.origin.x, m.header.origin.y, m.header.origin.z])
        np.testing.assert_allclose(origin, -(n // 2) * 10 * voxel_nm)
        labels = b" ".join(bytes(label) for label in m.header.label[: m.header.nlabl])
        assert b"density map 1 of 2" in labels and b"latent 1" in labels
        density = np.asarray(m.data, dtype=np.float64)
        angstrom = float(m.voxel_size.x)
    support = density > 0.5 * density.max()
    for axis in range(3):  # the particle's extent along each axis, in Angstrom, and its centre
        profile = support.any(axis=tuple(a for a in range(3) if a != axis))
        assert profile.sum() * angstrom == pytest.approx(10 * diameter_nm, rel=0.15)
        assert abs(np.flatnonzero(profile).mean() - n // 2) <= 1.5
