"""The neural phaser: input features and mask handling, the network, weights files, training
with resume, refinement of a prediction, and the CLI."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from spiscape import cli
from spiscape.errors import ConfigError, InputError
from spiscape.phasing import PhasingParams, measured_shell_mask, phase_from_start
from spiscape.phasing.neural import (
    NeuralSettings,
    PhaserNet,
    load_phaser,
    particle_extent,
    patterson_features,
    phase_with_network,
    shipped_model_path,
    twin_loss,
)
from spiscape.phasing.synth import KINDS, SynthSettings, cubic_average, sample
from spiscape.phasing.training import TrainPhaserConfig, train
from spiscape.phasing.volume import particle_volume_nm3
from spiscape.simulate.intensity import fft_intensity
from spiscape.simulate.shapes import cube_density, sphere_density

TINY = SynthSettings(grid=21, size_min=0.2, size_max=0.35)


def sphere_intensity(n: int, diameter: float, q_min: float = 1.5):
    obj = sphere_density(diameter, n, 1.0)
    intens = fft_intensity(obj, box_average=False)
    return obj, intens, measured_shell_mask(intens.shape, q_min, n // 2 - 1)


def test_features_shape_and_mask_handling():
    _, intens, measured = sphere_intensity(21, 7.0)
    feats = patterson_features(intens, measured)
    assert feats.shape == (3, 11, 11, 11) and feats.dtype == np.float32
    assert feats[0, 5, 5, 5] == pytest.approx(1.0) and feats[1, 5, 5, 5] == pytest.approx(1.0)
    # whatever the unmeasured voxels hold (NaN, garbage) does not reach the network
    messy = intens.copy()
    messy[~measured] = np.where(np.arange((~measured).sum()) % 2, np.nan, 1e9)
    assert np.array_equal(patterson_features(messy, measured), feats)
    # the mask channel: the unmeasured voxels' point-spread function, zero when all measured
    full = patterson_features(intens, np.ones_like(measured))
    assert np.all(full[2] == 0) and feats[2, 5, 5, 5] == pytest.approx(1.0)
    # the intensity scale does not matter
    assert np.allclose(patterson_features(7.0 * intens, measured), feats, atol=1e-6)
    # P(2r) > 0 on the particle (a convex centrosymmetric body): the extent reads ~ its diameter
    for diameter in (7.0, 9.0):
        _, i2, m2 = sphere_intensity(21, diameter)
        for mask in (m2, np.ones_like(m2)):
            assert particle_extent(patterson_features(i2, mask)) == pytest.approx(diameter,
                                                                                  rel=0.3)
    with pytest.raises(InputError, match="no measured"):
        patterson_features(intens, np.zeros_like(measured))


def test_network_output_shape_and_twin_loss():
    net = PhaserNet(widths=(16, 32))
    x = torch.randn(2, 3, 11, 11, 11)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 11, 11, 11) and float(y.min()) >= 0 and float(y.max()) <= 1
    target = torch.rand(2, 11, 11, 11)
    assert float(twin_loss(target.flip(1, 2, 3), target)) == 0.0  # the twin costs nothing
    assert float(twin_loss(target, target)) == 0.0


def test_synthetic_samples_are_deterministic_and_physical():
    a, b = sample(TINY, 3, 7), sample(TINY, 3, 7)
    assert np.array_equal(a.intens, b.intens) and a.kind == b.kind
    assert a.kind in KINDS and a.density.max() == pytest.approx(1.0)
    assert np.all(a.intens >= 0) and a.measured.any() and not a.measured.all()
    # m-3m average of a cube's intensity is the intensity itself; of a rod's it is not
    from spiscape.simulate.shapes import cube_density, rod_density

    cube = fft_intensity(cube_density(5.0, 21, 1.0), box_average=False)
    assert np.allclose(cubic_average(cube), cube, rtol=1e-6)
    rod = fft_intensity(rod_density(9.0, 3.0, 21, 1.0), box_average=False)
    assert not np.allclose(cubic_average(rod), rod, rtol=1e-3)


def test_loading_refuses_what_is_not_a_phaser(tmp_path):
    bad = tmp_path / "list.pt"
    torch.save([1, 2, 3], bad)
    with pytest.raises(InputError, match="no state_dict"):
        load_phaser(bad)

    from fractions import Fraction  # any Python object beyond tensors and plain values

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": Fraction(1, 3)}, evil)
    with pytest.raises(InputError, match="never unpickled"):
        load_phaser(evil)
    text = tmp_path / "text.pt"
    text.write_text("not torch")
    with pytest.raises(InputError, match="not a spiscape neural phaser"):
        load_phaser(text)
    state = {k: v.clone() for k, v in PhaserNet((16, 32)).state_dict().items()}
    edited = tmp_path / "edited.pt"
    torch.save({"state_dict": state, "sha256": "0" * 64, "settings": {"widths": [16, 32]}},
               edited)
    with pytest.raises(InputError, match="hash mismatch"):
        load_phaser(edited)


def _tiny_config(epochs: int) -> TrainPhaserConfig:
    return TrainPhaserConfig(synth=TINY, widths=(16, 32), samples=6, validation=2,
                             epochs=epochs, batch_size=3, seed=5, device="cpu")


def test_training_resumes_from_a_checkpoint_as_if_never_stopped(tmp_path, monkeypatch):
    from spiscape.phasing import training

    whole = train(_tiny_config(2), tmp_path / "whole.pt", checkpoint=tmp_path / "whole.ckpt")
    # the same run killed in its second epoch: its first epoch's checkpoint is all that is left
    real, calls = training.evaluate, []

    def killed(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(training, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        train(_tiny_config(2), tmp_path / "part.pt", checkpoint=tmp_path / "part.ckpt")
    monkeypatch.setattr(training, "evaluate", real)
    assert not (tmp_path / "part.pt").exists()
    resumed = train(_tiny_config(2), tmp_path / "part.pt", checkpoint=tmp_path / "part.ckpt",
                    resume=True)
    assert resumed["epoch"] == [1, 2]
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    a, b = load_phaser(tmp_path / "whole.pt"), load_phaser(tmp_path / "part.pt")
    assert a.sha256 == b.sha256
    other = _tiny_config(2)
    other.lr = 1e-4
    with pytest.raises(InputError, match="other settings"):
        train(other, tmp_path / "x.pt", checkpoint=tmp_path / "part.ckpt", resume=True)


def test_refining_a_crude_start_recovers_a_sphere():
    """The refinement half alone: a blob of the wrong size refined within a loose support."""
    n = 31
    obj, intens, measured = sphere_intensity(n, 10.0)
    start = sphere_density(13.0, n, 1.0).astype(np.float32)
    support = sphere_density(16.0, n, 1.0) > 0
    res = phase_from_start(intens, PhasingParams(recipe="40 RAAR 40 ER"), start[None], support,
                           measured=measured, reference=start)
    porod = [particle_volume_nm3(d, 1.0 / n, "porod", intens=intens, measured=measured)
             for d in (res.signed_density, obj)]
    assert porod[0] == pytest.approx(porod[1], rel=0.01)  # the rule's own value for the truth
    assert not res.converged  # the refined density is far from the start it was given


@pytest.mark.skipif(shipped_model_path() is None, reason="no shipped neural phaser")
def test_shipped_model_phases_a_tiny_sphere_to_its_radius():
    n = 31
    obj, intens, measured = sphere_intensity(n, 9.0)
    phaser = load_phaser()
    assert phaser.settings["synth"]["grid"] == 61  # applied at 31^3: fully convolutional
    raw = phase_with_network(intens, phaser, PhasingParams(), NeuralSettings(),
                             measured=measured, refine=False)
    res = phase_with_network(intens, phaser, PhasingParams(), NeuralSettings(),
                             measured=measured, refine=True)
    assert res.converged
    def radius(r):
        d = r.density
        return (3 * float((d > 0.5 * d.max()).sum()) / (4 * np.pi)) ** (1 / 3)

    assert radius(raw) == pytest.approx(4.5, abs=1.0)  # a start of about the right size
    assert radius(res) == pytest.approx(4.5, abs=0.3)  # refined: as random starts give (4.43)
    porod = [particle_volume_nm3(d, 1.0 / n, "porod", intens=intens, measured=measured)
             for d in (res.signed_density, obj)]
    assert porod[0] == pytest.approx(porod[1], rel=0.01)


def test_train_phaser_cli_config_errors(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epocs: 3\n")
    assert cli.main(["train-phaser", "--out", str(tmp_path / "m.pt"), "--config", str(cfg)]) == 2
    assert "epocs" in capsys.readouterr().err
    cfg.write_text("synth:\n  size_max: 0.9\n")
    assert cli.main(["train-phaser", "--out", str(tmp_path / "m.pt"), "--config", str(cfg)]) == 2
    assert "size_max" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        TrainPhaserConfig(widths=(8, 16)).check()


def test_cli_phase_with_a_trained_phaser(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("widths: [16, 32]\nsamples: 4\nvalidation: 2\nepochs: 1\nbatch_size: 2\n"
                   "synth: {grid: 21, size_min: 0.2, size_max: 0.35}\n")
    model = tmp_path / "m.pt"
    assert cli.main(["train-phaser", "--out", str(model), "--config", str(cfg), "--device", "cpu",
                     "--figure", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").exists()
    _, intens, measured = sphere_intensity(21, 7.0)
    intens = np.where(measured, intens, np.nan).astype(np.float32)
    src = tmp_path / "volumes.h5"
    with h5py.File(src, "w") as f:
        f["intens"] = intens[None]
        f["z"] = np.zeros((1, 1))
        f["has_data"] = np.array([True])
        f.attrs["q_per_voxel_inv_nm"] = 1.0 / 21
    out = tmp_path / "phasing.h5"
    for method in ("nn", "nn+refine"):
        assert cli.main(["phase", "--volumes", str(src), "--out", str(out), "--method", method,
                         "--phaser-model", str(model), "--device", "cpu", "--starts", "2",
                         "--recipe", "20 RAAR 20 ER"]) == 0
        with h5py.File(out) as f:
            # an untrained network's prediction may be refused: then random starts phased it
            assert f["method"][0].decode() in (method, "iterative")
            assert f.attrs["phaser_sha256"] == load_phaser(model).sha256
            assert np.isfinite(f["volume"][()]).all()
    # auto: random starts where the beamstop is wider than the model was trained on (5 voxels)
    for q_min, expected in ((6.0, "iterative"), (2.0, "nn+refine")):
        with h5py.File(src, "a") as f:
            f.attrs["q_min_measured"] = q_min
        assert cli.main(["phase", "--volumes", str(src), "--out", str(out), "--method", "auto",
                         "--phaser-model", str(model), "--device", "cpu", "--starts", "2",
                         "--recipe", "20 RAAR 20 ER"]) == 0
        with h5py.File(out) as f:
            assert f.attrs["method"] == expected
    averages = tmp_path / "averages.h5"
    with h5py.File(averages, "w") as f:
        f["intens"] = np.ones((1, 9, 9), dtype=np.float32)
        f["support"] = np.ones((9, 9), dtype=bool)
    assert cli.main(["phase", "--averages", str(averages), "--out", str(out), "--method",
                     "nn"]) == 2
    assert "3D volumes only" in capsys.readouterr().err


def test_physics_loss_and_unsupervised_finetuning():
    from spiscape.phasing.algorithms import amplitudes_and_mask
    from spiscape.phasing.neural import centred_window
    from spiscape.phasing.training import finetune, physics_loss

    n = 21
    obj, intens, measured = sphere_intensity(n, 7.0)
    amp, mask = amplitudes_and_mask(intens, measured)
    amp = torch.from_numpy(np.fft.ifftshift(amp)[None]).float()
    mask = torch.from_numpy(np.fft.ifftshift(mask)[None]).float()

    def loss(density):
        window = torch.from_numpy(centred_window(density, 5, 1))[None].float()
        return float(physics_loss(window, amp, mask))

    assert loss(obj) < 1e-6 and loss(0.3 * obj) < 1e-6  # the scale is fitted
    assert loss(np.flip(obj)) < 1e-6  # the twin fits as well
    assert loss(sphere_density(5.0, n, 1.0)) > 0.1  # a smaller sphere does not
    _, other, _ = sphere_intensity(n, 6.0)
    history = finetune(PhaserNet((16, 32)), np.stack([intens, other]), measured, epochs=4,
                       lr=1e-3)
    assert len(history) == 5 and history[-1] < history[0]


@pytest.mark.gpu
def test_refinement_on_cupy_matches_numpy(cupy):
    n = 31
    _, intens, measured = sphere_intensity(n, 10.0)
    start = sphere_density(11.0, n, 1.0).astype(np.float32)
    support = sphere_density(14.0, n, 1.0) > 0
    params = PhasingParams(recipe="20 RAAR 20 ER")
    out = [phase_from_start(intens, params, start[None], support, xp=xp, measured=measured,
                            reference=start, agree_sigma=1.0) for xp in (np, cupy)]
    assert out[0].converged == out[1].converged
    assert np.corrcoef(out[0].density.ravel(), out[1].density.ravel())[0, 1] > 0.999


@pytest.mark.gpu
def test_densities_agree_on_cupy_matches_numpy(cupy):
    """The independent-phasing check (spiscape phase keeps a reproduced outlier) aligns on the
    run's array module: the same CC on CuPy as on NumPy, for the same density and another."""
    from spiscape.phasing import densities_agree

    n = 24
    cube = cube_density(6.0, n, 1.0).astype(np.float32)
    moved = np.roll(cube[::-1, ::-1, ::-1], (3, -2, 1), axis=(0, 1, 2))
    other = sphere_density(4.0, n, 1.0).astype(np.float32)
    for b in (moved, other):
        host = densities_agree(cube, b, 0.8)
        device = densities_agree(cupy.asarray(cube), cupy.asarray(b), 0.8, xp=cupy)
        assert host[0] == device[0]
        assert device[1] == pytest.approx(host[1], abs=1e-4)
