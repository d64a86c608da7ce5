"""The EMC merge in the VAE's forward model against what the 2D EMC actually produces."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from spiscape.emc import EMC2D, EMCParams
from spiscape.errors import InputError
from spiscape.orient.rotations import to_matrix
from spiscape.vae.merge import merge_operator, read_emc_geometry
from spiscape.vae.model import ewald_grid, slice_volumes


@pytest.fixture(scope="module")
def emc_of_one_view(tiny_dataset, one_view_photons, tmp_path_factory):
    """The one-view frames classified into one class, the averages left as the merge made them
    (--sharpen-iterations 0: the merge is what the operator models)."""
    det, cube, quat, photons = one_view_photons
    out = tmp_path_factory.mktemp("merge")
    params = EMCParams(num_classes=1, num_rot=12, iterations=6, friedel=False,
                       need_scaling=False, seed=1, sharpen_iterations=0)
    EMC2D([photons], tiny_dataset / "detector.h5", params).run(out / "rep0.h5")
    return det, cube, quat, out / "rep0.h5"


def test_merge_operator_predicts_the_emc_average(emc_of_one_view):
    det, cube, quat, rep = emc_of_one_view
    geo = read_emc_geometry([rep])
    with h5py.File(rep) as f:
        model = f["intens"][0].astype(np.float64)
    size = geo.size
    vol = torch.as_tensor(cube[None], dtype=torch.float32)
    grid = torch.as_tensor(ewald_grid(size, det.detd, det.ewald_rad).reshape(3, -1)).float()
    points, matrix = merge_operator(det, geo, size)
    radius = np.linalg.norm(ewald_grid(size, det.detd, det.ewald_rad), axis=0).ravel()
    keep = (matrix.getnnz(axis=1) > 0) & (radius >= 3) & (radius <= size // 2 - 2)
    target = model.ravel()[keep]

    def error(pred):
        pred = pred[keep] * target.sum() / pred[keep].sum()
        return np.sqrt(np.mean((pred - target) ** 2)) / target.std()

    # the EMC fixes the model only up to one of its in-plane angles: the best of them
    errors = {"plain": [], "merged": []}
    for turn in geo.angles:
        rz = to_matrix([[np.cos(turn / 2), 0.0, 0.0, np.sin(turn / 2)]])[0]
        rot = torch.as_tensor(to_matrix(quat)[0] @ rz, dtype=torch.float32)[None]
        errors["plain"].append(error(slice_volumes(vol, grid, rot)[0].numpy()))
        errors["merged"].append(error(
            matrix @ slice_volumes(vol, torch.as_tensor(points), rot)[0].numpy()))
    plain, merged = min(errors["plain"]), min(errors["merged"])
    assert merged < 0.05, (merged, plain)
    assert merged < plain / 3, (merged, plain)
    # cropped averages: the central rows of the same operator
    _, small = merge_operator(det, geo, size - 4)
    np.testing.assert_allclose(small.toarray(),
                               matrix.toarray().reshape(size, size, -1)[2:-2, 2:-2].reshape(
                                   (size - 4) ** 2, -1), atol=1e-7)


def test_emc_geometry_must_agree_and_fit(emc_of_one_view, tmp_path):
    det, _, _, rep = emc_of_one_view
    other = tmp_path / "rep1.h5"
    with h5py.File(rep) as src, h5py.File(other, "w") as dst:
        for key in src:  # a whole replicate, but for its angles
            if key != "angles":
                dst[key] = src[key][()]
        dst["angles"] = src["angles"][()] + 0.1
        dst.attrs["params"] = src.attrs["params"]
    with pytest.raises(InputError, match="differs"):
        read_emc_geometry([rep, other])
    sharpened = tmp_path / "rep2.h5"
    with h5py.File(rep) as src, h5py.File(sharpened, "w") as dst:
        for key in src:
            dst[key] = src[key][()]
        dst.attrs["params"] = json.dumps({**json.loads(src.attrs["params"]),
                                          "sharpen_iterations": 20})
    with pytest.raises(InputError, match="sharpened"):
        read_emc_geometry([sharpened])
    geo = read_emc_geometry([rep])
    with pytest.raises(InputError, match="do not fit"):
        merge_operator(det, geo, geo.size + 2)


def test_vae_forward_and_training_use_the_merge(emc_of_one_view, tmp_path):
    from spiscape.vae.model import SPIVAE
    from spiscape.vae.train import TrainConfig, train

    det, _, quat, rep = emc_of_one_view
    geo = read_emc_geometry([rep])
    size = geo.size
    points, matrix = merge_operator(det, geo, size)
    q = ewald_grid(size, det.detd, det.ewald_rad)
    torch.manual_seed(0)
    model = SPIVAE(1, 15, size, q, np.zeros(17), "m-3m", 4, 8, 32)
    model.set_merge(points, matrix)
    image = torch.rand(2, size, size)
    quats = torch.as_tensor(np.stack([quat, quat]), dtype=torch.float32)
    pred, mu, _ = model(image, torch.ones(size, size), quats, torch.zeros(2), sample=False)
    rot = torch.as_tensor(to_matrix(quat), dtype=torch.float32).expand(2, 3, 3)
    sliced = slice_volumes(model.volumes(mu)[:, :, :, :], torch.as_tensor(points), rot)
    want = (matrix @ sliced.detach().numpy().T).T.reshape(2, size, size)
    np.testing.assert_allclose(pred.detach().numpy(), want, rtol=1e-4, atol=1e-6)
    # and a training epoch with it, as spiscape vae --emc-merge runs it
    from spiscape.vae.data import VAEData, loss_weight, radial_profile, tensors

    with h5py.File(rep) as f:
        avg = np.repeat(f["intens"][()], 4, axis=0)
        support = f["support"][()].astype(bool)
    data = VAEData(intens=avg, support=support, quaternion=np.repeat(quat[None], 4, 0),
                   gain=np.ones(4), replicate=np.zeros(4, int), klass=np.arange(4),
                   frames=np.full(4, 10), selected=np.ones(4, bool))
    qn = np.linalg.norm(q, axis=0)
    prof = radial_profile(data.intens, data.support, qn, nbins=17)
    cfg = TrainConfig(zdim=1, volume_size=15, epochs=1, batch_size=4, device="cpu",
                      check_every=0, enc_channels=4, dec_channels=8, hidden=32)
    trained, result = train(cfg, tensors(data, q, prof), loss_weight(data.support, qn, 15), q,
                            prof, tmp_path, merge=(points, matrix))
    assert trained.merge_matrix is not None and np.isfinite(result["history"]["loss"][0])
