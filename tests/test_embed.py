"""Embedding of the common-line matrix, clustering, rotation-invariant features, the regressor."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from spiscape import cli
from spiscape.embed import clustering, embedding, features
from spiscape.embed.regressor import AbsoluteEmbedding, TrainParams, fit_absolute_embedding
from spiscape.errors import ConfigError, InputError


def block_cc(sizes, inside=0.9, between=(0.2, 0.5), noise=0.02, seed=0):
    """A symmetric similarity matrix with high correlation inside blocks, lower between."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    level = rng.uniform(*between, (len(sizes), len(sizes)))
    level = (level + level.T) / 2
    np.fill_diagonal(level, inside)
    cc = level[truth][:, truth] + rng.normal(0, noise, (truth.size,) * 2)
    cc = (cc + cc.T) / 2
    np.fill_diagonal(cc, 1.0)
    return cc, truth


def speckle_image(size, width, elongation, angle, friedel=True):
    """A smooth anisotropic pattern: Gaussian envelope times a ring, turned by ``angle``."""
    c = (size - 1) / 2
    x, y = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    image = np.exp(-(u**2 / (width * elongation) ** 2 + v**2 / width**2) / 2)
    image *= 1 + 0.5 * np.cos(np.hypot(x, y) / 1.5) ** 2
    if not friedel:
        image *= 1 + 0.3 * (u > 0)
    return 100 * image + 1e-3


def line_cc(intens, num_angles=36):
    """Common-line correlation of averages: best Pearson r between central lines (test helper)."""
    size = intens.shape[1]
    c = (size - 1) / 2
    radii = np.arange(1, int(c))
    theta = np.pi * np.arange(num_angles) / num_angles
    x = c + radii[None] * np.cos(theta)[:, None]
    y = c + radii[None] * np.sin(theta)[:, None]
    from scipy import ndimage

    lines = np.stack([ndimage.map_coordinates(np.log(a), [x, y], order=1) for a in intens])
    lines -= lines.mean(axis=2, keepdims=True)
    lines /= np.linalg.norm(lines, axis=2, keepdims=True)
    cc = np.einsum("air,bjr->abij", lines, lines).max(axis=(2, 3))
    np.fill_diagonal(cc, 1.0)
    return (cc + cc.T) / 2


def test_clpca_separates_blocks():
    cc, truth = block_cc([6, 5, 7])
    result = embedding.clpca(cc, components=2)
    assert result.coords.shape == (18, 2)
    assert np.all(np.diff(result.explained_variance) <= 0)
    assert 0 < result.explained_variance_ratio.sum() <= 1
    labels = clustering.cluster(result.coords, "kmeans", 3, seed=1).labels
    assert adjusted_rand_score(truth, labels) == 1.0
    # sign convention: deterministic, largest-magnitude coordinate positive
    again = embedding.clpca(cc.copy(), 2).coords
    assert np.array_equal(result.coords, again)
    assert np.all(result.coords[np.abs(result.coords).argmax(axis=0), [0, 1]] > 0)


def test_fisher_transform_spreads_high_correlations():
    cc = np.array([[1.0, 0.99, 0.9], [0.99, 1.0, 0.95], [0.9, 0.95, 1.0]])
    z = embedding.transform_cc(cc, "fisher")
    np.testing.assert_allclose(z[0, 1], np.arctanh(0.99))
    np.testing.assert_allclose(np.diag(z), np.arctanh(0.99))  # the largest off-diagonal z
    assert z[0, 1] - z[1, 2] > 5 * (cc[0, 1] - cc[1, 2])
    np.testing.assert_array_equal(embedding.transform_cc(cc, "none"), cc)
    with pytest.raises(ConfigError, match="cc transform"):
        embedding.transform_cc(cc, "square")
    # crowded near 1, the blocks are still found with either transform
    crowded, truth = block_cc([6, 5, 7], inside=0.995, between=(0.97, 0.985), noise=0.001)
    for transform in ("fisher", "none"):
        coords = embedding.embed(crowded, "pca", 2, cc_transform=transform).coords
        labels = clustering.cluster(coords, "kmeans", 3, seed=1).labels
        assert adjusted_rand_score(truth, labels) == 1.0


@pytest.mark.parametrize("method", ["isomap", "spectral", "tsne"])
def test_other_embeddings_run_and_separate(method):
    cc, truth = block_cc([8, 8, 8], noise=0.01)
    result = embedding.embed(cc, method, components=2, seed=3, neighbors=10)
    assert result.coords.shape == (24, 2) and np.all(np.isfinite(result.coords))
    labels = clustering.cluster(result.coords, "kmeans", 3, seed=1).labels
    assert adjusted_rand_score(truth, labels) > 0.9


def test_embedding_choices_are_checked(monkeypatch):
    cc, _ = block_cc([4, 4])
    with pytest.raises(ConfigError, match="components"):
        embedding.embed(cc, "pca", components=8)
    with pytest.raises(ConfigError, match="unknown embedding"):
        embedding.embed(cc, "lle")
    import builtins

    real_import = builtins.__import__

    def no_umap(name, *args, **kwargs):
        if name == "umap":
            raise ImportError("no umap")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_umap)
    with pytest.raises(ConfigError, match="umap-learn"):
        embedding.embed(cc, "umap", components=2)


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_auto_cluster_count_on_blobs(method):
    rng = np.random.default_rng(2)
    centres = np.array([[0, 0], [6, 0], [0, 6], [6, 6]], float)
    truth = np.repeat(np.arange(4), 15)
    coords = centres[truth] + rng.normal(0, 0.4, (truth.size, 2))
    result = clustering.cluster(coords, method, "auto", seed=1, max_clusters=6)
    assert result.num_clusters == 4
    assert adjusted_rand_score(truth, result.labels) == 1.0
    assert set(result.scores) >= {2, 3, 4}
    sizes = np.bincount(result.labels)
    assert np.all(np.diff(sizes) <= 0)  # numbered by size


@pytest.mark.parametrize("method", ["dbscan", "hdbscan"])
def test_density_clustering_finds_blobs_and_outliers(method):
    rng = np.random.default_rng(4)
    truth = np.repeat(np.arange(3), 12)
    coords = np.array([[0, 0], [5, 0], [0, 5]], float)[truth] + rng.normal(0, 0.3, (36, 2))
    coords = np.vstack([coords, [[20.0, 20.0]]])
    result = clustering.cluster(coords, method, seed=1)
    assert result.num_clusters == 3
    assert result.labels[-1] == -1
    assert adjusted_rand_score(truth, result.labels[:-1]) == 1.0


def test_cluster_arguments_checked():
    with pytest.raises(ConfigError, match="unknown clustering"):
        clustering.cluster(np.zeros((5, 2)), "spectral")
    with pytest.raises(ConfigError, match="clusters asked"):
        clustering.cluster(np.zeros((5, 2)), "kmeans", 9)


def test_features_rotation_and_friedel_invariant():
    size = 25
    support = np.ones((size, size), bool)
    support[10:15, 10:15] = False  # a beamstop
    image = speckle_image(size, 4.0, 1.8, 0.4, friedel=False)
    params = features.choose_params(support)
    assert params.num_angles % 4 == 0 and params.radii[0] >= 3  # rings through the stop dropped
    for h, r in zip(params.harmonics, params.radii, strict=True):
        assert np.all(h % 2 == 0) and h.max() <= np.pi * r
    f0, _ = features.rotation_invariant_features(image, support, params)
    f90, _ = features.rotation_invariant_features(np.rot90(image), np.rot90(support), params)
    friedel, _ = features.rotation_invariant_features(image[::-1, ::-1], support, params)
    gain, _ = features.rotation_invariant_features(7.5 * image, support, params)
    assert f0.shape == (1, params.num_features)
    np.testing.assert_allclose(f90, f0, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(friedel, f0, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gain, f0, rtol=1e-6, atol=1e-9)
    # an arbitrary turn: equal up to interpolation
    from scipy import ndimage

    turned = ndimage.rotate(image, 33, reshape=False, order=3, mode="nearest")
    f33, _ = features.rotation_invariant_features(np.clip(turned, 1e-3, None), support, params)
    assert np.linalg.norm(f33 - f0) < 0.1 * np.linalg.norm(f0)
    # but features do tell different shapes apart
    other, _ = features.rotation_invariant_features(speckle_image(size, 4.0, 1.0, 0.4), support,
                                                    params)
    assert np.linalg.norm(other - f0) > 0.2 * np.linalg.norm(f0)


def smooth_problem(count=120, size=21, seed=0):
    rng = np.random.default_rng(seed)
    width = rng.uniform(2.5, 5.0, count)
    elongation = rng.uniform(1.0, 2.0, count)
    angle = rng.uniform(0, np.pi, count)
    intens = np.stack([speckle_image(size, w, e, a) for w, e, a in
                       zip(width, elongation, angle, strict=True)])
    return intens, np.column_stack([width, elongation])


def test_regressor_learns_a_smooth_map_and_reloads(tmp_path):
    intens, coords = smooth_problem(count=100, size=17)
    params = TrainParams(epochs=300, patience=40, seed=5)
    model = fit_absolute_embedding(intens, None, coords, params, progress=False)
    mse = np.array(model.metrics["validation_mse"])
    assert model.metrics["validation_size"] == 20 and model.metrics["train_size"] == 80
    assert np.all(mse < 0.05 * coords.var(axis=0)), (mse, coords.var(axis=0))
    path = tmp_path / "model.pt"
    model.save(path)
    again = AbsoluteEmbedding.load(path)
    assert again.components == 2 and again.feature_params == model.feature_params
    np.testing.assert_allclose(again.predict(intens[:7]), model.predict(intens[:7]), rtol=1e-6)
    # turned averages land in the same place
    turned = np.stack([np.rot90(a) for a in intens[:7]])
    np.testing.assert_allclose(again.predict(turned), model.predict(intens[:7]), atol=1e-4)
    # seeded: the same fit twice
    twice = fit_absolute_embedding(intens, None, coords, params, progress=False)
    np.testing.assert_allclose(twice.predict(intens[:3]), model.predict(intens[:3]), rtol=1e-5)


def test_model_load_rejects_other_files(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_text("not a model")
    with pytest.raises(InputError, match="not a spiscape embedding model"):
        AbsoluteEmbedding.load(bad)


def write_inputs(folder, intens, replicate=None):
    count = intens.shape[0]
    with h5py.File(folder / "averages.h5", "w") as f:
        f["intens"] = intens.astype(np.float32)
        f["replicate"] = np.zeros(count, np.int32) if replicate is None else replicate
        f["class"] = np.arange(count, dtype=np.int32)
        f["frames"] = np.full(count, 10.0)
        f["support"] = np.ones(intens.shape[1:], bool)
    with h5py.File(folder / "commonlines.h5", "w") as f:
        f["cc"] = line_cc(intens)
        f["angles"] = np.zeros((count, count, 2))


def test_embed_and_embed_new_cli(tmp_path, capsys):
    rng = np.random.default_rng(1)
    # three shapes, each seen at random in-plane angles
    shapes = [(3.0, 1.0), (3.0, 2.2), (5.0, 1.0)]
    truth = np.repeat(np.arange(3), 8)
    intens = np.stack([speckle_image(21, *shapes[s], rng.uniform(0, np.pi)) for s in truth])
    write_inputs(tmp_path, intens)
    out, model, figs = tmp_path / "embedding.h5", tmp_path / "model.pt", tmp_path / "figs"
    code = cli.main(["embed", "--commonlines", str(tmp_path / "commonlines.h5"),
                     "--averages", str(tmp_path / "averages.h5"), "--out", str(out),
                     "--model", str(model), "--figure-dir", str(figs), "--epochs", "300",
                     "--patience", "40", "--num-clusters", "auto"])
    assert code == 0
    with h5py.File(out) as f:
        coords, labels = f["coords"][()], f["labels"][()]
        assert coords.shape == (24, 3) and f["explained_variance"].shape == (3,)
        import json

        metrics = json.loads(f.attrs["metrics"])
    assert adjusted_rand_score(truth, labels) == 1.0
    assert len(metrics["regressor"]["validation_mse"]) == 3
    assert {p.name for p in figs.iterdir()} == {"embedding.png", "explained_variance.png",
                                                  "cluster_montage.png", "regressor.png"}
    new = tmp_path / "new.h5"
    assert cli.main(["embed-new", "--model", str(model), "--averages",
                     str(tmp_path / "averages.h5"), "--out", str(new), "--embedding", str(out),
                     "--figure", str(tmp_path / "new.png")]) == 0
    with h5py.File(new) as f:
        placed, new_labels = f["coords"][()], f["labels"][()]
    assert placed.shape == coords.shape
    assert np.mean(new_labels == labels) > 0.9  # training averages land in their own clusters
    # errors: one line, exit status 2
    capsys.readouterr()
    code = cli.main(["embed", "--commonlines", str(tmp_path / "missing.h5"), "--averages",
                     str(tmp_path / "averages.h5"), "--out", str(tmp_path / "x.h5")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.h5: no such file" in err and len(err.strip().splitlines()) == 1
    with h5py.File(tmp_path / "small.h5", "w") as f:
        f["intens"] = intens[:5, :15, :15]
        f["replicate"] = np.zeros(5, np.int32)
        f["class"] = np.arange(5, dtype=np.int32)
    assert cli.main(["embed-new", "--model", str(model), "--averages", str(tmp_path / "small.h5"),
                     "--out", str(tmp_path / "y.h5")]) == 2
    assert "trained on 21x21" in capsys.readouterr().err
    code = cli.main(["embed", "--commonlines", str(tmp_path / "commonlines.h5"), "--averages",
                     str(tmp_path / "small.h5"), "--out", str(tmp_path / "x.h5")])
    assert code == 2 and "holds 5 averages" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()


def test_progress_bars_stay_out_of_log_files(capsys):
    # with progress on but stderr not a terminal (a Snakemake log), no bar is drawn: logs hold
    # lines, not hundreds of carriage returns
    intens, coords = smooth_problem(count=30, size=13)
    fit_absolute_embedding(intens, None, coords, TrainParams(epochs=20, patience=5, seed=1),
                           progress=True)
    assert "\r" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- noise correction
def attenuated_cc(sizes=(12, 10, 8), seed=3):
    """Blocks of true CC 1 inside, 0.6 between, each average attenuated by its reliability."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    true_cc = np.where(truth[:, None] == truth[None, :], 1.0, 0.6)
    reliability = rng.uniform(0.6, 1.0, truth.size)
    cc = true_cc * np.sqrt(reliability[:, None] * reliability[None, :])
    np.fill_diagonal(cc, 1.0)
    return cc, truth, reliability


def test_noise_correction_recovers_reliabilities_and_true_correlations():
    cc, truth, reliability = attenuated_cc()
    corrected, found = embedding.disattenuate(cc, 5)
    np.testing.assert_allclose(found, reliability, rtol=0.02)
    same = (truth[:, None] == truth[None, :]) & ~np.eye(truth.size, dtype=bool)
    assert corrected[same].min() > 0.98
    np.testing.assert_allclose(corrected[~same & (truth[:, None] != truth[None, :])], 0.6,
                               atol=0.02)
    unchanged, ones = embedding.disattenuate(cc, 0)
    assert unchanged is not None and np.array_equal(unchanged, cc) and np.all(ones == 1.0)


def test_noise_correction_takes_the_noise_level_out_of_the_landscape():
    """Without it, each block's averages spread by their noise level along a direction of
    their own (ordered by reliability); with it, each block collapses onto one point."""
    from scipy.stats import spearmanr

    cc, truth, reliability = attenuated_cc((20, 20), seed=4)
    spreads = {}
    for k in (0, 5):
        coords = embedding.embed(cc, "pca", 2, noise_neighbours=k).coords
        gap = np.linalg.norm(coords[truth == 0].mean(0) - coords[truth == 1].mean(0))
        spreads[k] = coords[truth == 0].std(axis=0).max() / gap
        if k == 0:
            rho = max(abs(spearmanr(coords[truth == 0, j], reliability[truth == 0]).statistic)
                      for j in range(2))
            assert rho > 0.9
    assert spreads[0] > 0.1 and spreads[5] < 0.02, spreads


def test_noise_correction_keeps_a_small_set_of_two_species_apart():
    """Eight averages, four per species: five partners would reach across the species and lift
    every CC to the clip; the partners are capped at a tenth of the averages (at least 1)."""
    cc, truth, _ = attenuated_cc((4, 4), seed=5)
    corrected, _ = embedding.disattenuate(cc, 5)
    between = corrected[truth[:, None] != truth[None, :]]
    assert between.max() < 0.8
    coords = embedding.embed(cc, "pca", 2, noise_neighbours=5).coords
    assert np.ptp(coords[:, 0]) > 0


def test_embed_cli_splits_a_cluster_whose_averages_share_no_frames(tmp_path, capsys):
    """One k-means cluster (--num-clusters 1) holds two objects whose classes never share a
    frame: `spiscape embed --replicates` splits it (logged, in the metrics); 0 turns it off."""
    import json

    from spiscape.io.replicate import write_replicate

    rng = np.random.default_rng(2)
    intens = np.stack([speckle_image(21, 3.0, 1.0, rng.uniform(0, np.pi)) for _ in range(8)])
    write_inputs(tmp_path, intens)
    # 8 classes of replicate 0 over 80 frames: frames 0-49 spread over classes 0-4 (one object
    # at neighbouring orientations), frames 50-79 over classes 5-7 (another)
    occ = np.zeros((80, 8), np.float32)
    occ[:50, :5] = rng.dirichlet(np.ones(5), 50)
    occ[50:, 5:] = rng.dirichlet(np.ones(3), 30)
    write_replicate(tmp_path / "rep0.h5", {
        "intens": intens, "frames": np.arange(80), "occupancies": occ,
        "best_rotation": np.zeros(80, np.int32), "best_class": occ.argmax(1).astype(np.int32),
        "scale": np.ones(80), "log": np.zeros(2), "angles": np.zeros(3),
        "model_pixels": np.arange(7), "support": np.ones((21, 21), bool),
        "empty_frames": np.zeros(0, np.int64)}, {"params": '{"replicate": 0}'})

    def run(*extra):
        out = tmp_path / "embedding.h5"
        args = ["embed", "--commonlines", str(tmp_path / "commonlines.h5"), "--averages",
                str(tmp_path / "averages.h5"), "--out", str(out), "--num-clusters", "1",
                "--replicates", str(tmp_path / "rep0.h5"), *extra]
        assert cli.main(args) == 0
        with h5py.File(out) as f:
            if "shared_frames" in f:  # the two objects share nothing, each with itself 1
                assert f["shared_frames"][()].tolist() == [[1.0, 0.0], [0.0, 1.0]]
                assert f.attrs["split_shared_frames"] == 5e-4
            return f["labels"][()], json.loads(f.attrs["metrics"])["clusters"]

    labels, clusters = run()
    assert labels.tolist() == [0] * 5 + [1] * 3 and clusters["num_clusters"] == 2
    with h5py.File(tmp_path / "embedding.h5") as f:
        assert "shared_frames" in f
    assert [s["sizes"] for s in clusters["shared_frame_splits"]] == [[5, 3]]
    assert "cluster 0 split 5 | 3 averages" in capsys.readouterr().err
    labels, clusters = run("--split-shared-frames", "0")
    assert labels.tolist() == [0] * 8 and clusters["shared_frame_splits"] == []
    with h5py.File(tmp_path / "embedding.h5") as f:
        assert "shared_frames" not in f
