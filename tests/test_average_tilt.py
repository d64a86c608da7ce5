"""Averages predicted over a ring of tilts out of their plane (SPIVAE ``average_tilt``): the ring's
geometry, that the angle is identifiable from averages of one volume at many orientations, and
that training fits it, saves it and the misfit rule reads the same prediction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spiscape.simulate.frames import random_quaternions
from spiscape.vae import frame_posterior as fp
from spiscape.vae import model as vm
from spiscape.vae.misfit import average_misfit
from spiscape.vae.train import load_model, save_model, setup_distributed, train
from tests.test_vae import analytic_volumes, small_cfg, tiny, training_inputs  # noqa: F401

torch.set_num_threads(1)


def test_tilt_ring_is_the_frames_ring_and_differentiable():
    angle = torch.tensor(math.radians(6.0), dtype=torch.float64, requires_grad=True)
    ring = vm.tilt_ring(angle, 8)
    assert np.allclose(ring.detach().numpy(), fp.tilt_rotations(6.0, 8), atol=1e-12)
    # the beam axis turns by the angle; the ring moves with it
    (grad,) = torch.autograd.grad(ring[1:, 2, 2].sum(), angle)
    assert np.isclose(float(grad), -8 * math.sin(math.radians(6.0)))


def ring_slices(vol, q, rot, angle):
    """Mean over the ring of tilts by ``angle`` (radians, tensor) of the slices at ``rot``."""
    rots = rot[:, None] @ vm.tilt_ring(angle)[None]
    return vm.slice_volumes(vol.expand(rot.shape[0], *vol.shape), q, rots).mean(1)


@pytest.mark.parametrize("truth", [10.0, 0.0])
def test_the_angle_is_read_from_averages_of_one_volume_at_many_orientations(truth):
    """Averages of a cube blurred over a ring of 10 degrees (or not at all): fitting the angle
    alone from below and from above lands on the truth; a single slice cannot blur them."""
    n, s = 21, 17
    vol = torch.tensor(analytic_volumes(n)[0], dtype=torch.float32)
    q = torch.tensor(vm.ewald_grid(s, 80.0, 80.0).reshape(3, -1), dtype=torch.float32)
    inside = torch.linalg.norm(q, dim=0) <= n // 2 - 1
    rot = vm.quaternion_to_matrix(torch.tensor(
        random_quaternions(16, np.random.default_rng(2)), dtype=torch.float32))
    with torch.no_grad():
        target = ring_slices(vol, q, rot, torch.tensor(math.radians(truth)))
    log_target = torch.log(target[:, inside])
    fitted = []
    for start in (3.0, 18.0):
        angle = torch.tensor(math.radians(start), requires_grad=True)
        opt = torch.optim.Adam([angle], lr=0.015)
        for _ in range(100):
            opt.zero_grad()
            loss = (torch.log(ring_slices(vol, q, rot, angle)[:, inside]) - log_target).pow(2)
            loss.mean().backward()
            opt.step()
        fitted.append(math.degrees(abs(float(angle.detach()))))
    assert np.allclose(fitted, truth, atol=1.0), fitted


def test_training_fits_the_angle_after_pose_start_and_the_model_keeps_it(tiny, tmp_path):  # noqa: F811
    _, sim = tiny
    cfg = small_cfg(epochs=4, average_tilt=8.0, learn_tilt=True, pose_start=2)
    tens, weight, q, prof = training_inputs(sim, cfg)
    model, result = train(cfg, tens, weight, q, prof, tmp_path, ctx=setup_distributed("cpu"))
    tilt = result["history"]["tilt_deg"]
    assert np.allclose(tilt[:2], 8.0, atol=1e-5)  # held until the decoder has a first volume
    assert abs(tilt[3] - 8.0) > 1e-3 and model.tilt_deg() == pytest.approx(tilt[3])
    save_model(tmp_path / "model.pt", model, prof, q, {})
    again = load_model(tmp_path / "model.pt")
    assert again.tilt_deg() == pytest.approx(model.tilt_deg())
    model.eval()
    args = (tens["image"][:3], torch.as_tensor(weight, dtype=torch.float32),
            tens["quaternion"][:3], tens["log_gain"][:3])
    with torch.no_grad():
        pred, mu, _ = model(*args, sample=False)
        assert torch.allclose(again(*args, sample=False)[0], pred)
    # the misfit rule scores the averages against the same ring-averaged prediction
    intens = pred.numpy().astype(np.float64)
    mis = average_misfit(model, intens, weight, mu.numpy(), tens["quaternion"][:3].numpy(),
                         np.zeros(3), np.arange(3))
    assert np.all(mis < 1e-10)
    plain = vm.SPIVAE(**{**model.config, "average_tilt": 0.0, "learn_tilt": False}, q=q,
                      radial_log_profile=np.log(prof))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "tilt"})
    assert plain.tilt is None and plain.tilt_deg() == 0.0
    assert np.all(average_misfit(plain.eval(), intens, weight, mu.numpy(),
                                 tens["quaternion"][:3].numpy(), np.zeros(3), np.arange(3)) > 1e-6)


def test_a_zero_ring_is_the_single_slice(tiny):  # noqa: F811
    _, sim = tiny
    cfg = small_cfg()
    tens, weight, q, prof = training_inputs(sim, cfg)
    torch.manual_seed(0)
    ringed = vm.SPIVAE(cfg.zdim, cfg.volume_size, 13, q, np.log(prof), enc_channels=4,
                       dec_channels=8, hidden=32, average_tilt=0.0, learn_tilt=True).eval()
    plain = vm.SPIVAE(cfg.zdim, cfg.volume_size, 13, q, np.log(prof), enc_channels=4,
                      dec_channels=8, hidden=32).eval()
    plain.load_state_dict({k: v for k, v in ringed.state_dict().items() if k != "tilt"})
    args = (tens["image"][:4], torch.as_tensor(weight, dtype=torch.float32),
            tens["quaternion"][:4], tens["log_gain"][:4])
    with torch.no_grad():
        assert torch.allclose(ringed(*args, sample=False)[0], plain(*args, sample=False)[0],
                              atol=1e-6)
    with pytest.raises(ValueError, match="average_tilt"):
        vm.SPIVAE(1, 15, 13, q, np.log(prof), average_tilt=-1.0)


def test_cli_average_tilt_auto_fits_the_angle_from_its_start():
    from spiscape.cli import build_parser
    from spiscape.vae.train import AVERAGE_TILT_START, tilt_settings

    base = ["vae", "--averages", "a.h5", "--orientation", "o.h5", "--detector", "d.h5",
            "--out-dir", "out"]

    def settings(*extra):
        return tilt_settings(build_parser("vae").parse_args(base + list(extra)).average_tilt)

    assert settings("--average-tilt", "auto") == (AVERAGE_TILT_START, True)
    assert settings("--average-tilt", "5") == (5.0, False)
    assert settings() == (0.0, False)
    with pytest.raises(SystemExit):
        build_parser("vae").parse_args(base + ["--average-tilt", "-2"])
