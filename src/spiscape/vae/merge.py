"""The EMC merge as part of the VAE's forward model.

A 2D EMC class average is not a slice of the 3D intensity: the M-step (:mod:`spiscape.emc.run`,
as in Dragonfly) back-projects every detector pixel of every frame onto the S x S model grid at the
frame's in-plane angle with bilinear weights, and normalises. Each grid point is thereby a
weighted mean of the pattern at the rotated pixel positions within one pixel of it: a blur of
about half a pixel, negligible where the pattern is smooth but not at a steep fall-off. On a cube's
central speckle (the demo geometry, one class of one orientation, noiseless frames) the class
average reads 10 % low at |q| = 3-4 px and 31 % high at 4-5 px against the slice (without
in-plane rotations it equals the slice to 0.1 %), and the demo's pure-cube averages are 5 % low
and 22 % high there against the truth: the plain-slice decoder puts that blur into the volume.

:func:`merge_operator` builds the linear map from a pattern sampled at every merged detector pixel
rotated to every in-plane angle (the points ``q (3, K P)``, Ewald q rotated about the beam) to
the merged average: ``M (S^2, K P)`` = diag(1 / E^T 1) E^T with E the EMC's own bilinear view
operator, Friedel-symmetrised when the EMC was, and cropped to the averages' grid. The VAE slices
its volume at ``q`` and applies ``M`` (:meth:`spiscape.vae.model.SPIVAE.set_merge`), so that the
decoded volume is the intensity whose merged slices are the averages. Replicates whose averages
classify2d sharpened (``--sharpen-iterations`` > 0, :meth:`spiscape.emc.run.EMC2D.sharpen`) are
refused: their averages are not this merge. Every frame is assumed merged at its own angle with
the same weight: the spread of EMC's orientation probabilities over in-plane angles blurs along
the rings only, which the ring-wise scores do not see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spiscape.errors import InputError


@dataclass
class EMCGeometry:
    angles: np.ndarray  # (K,) in-plane angles, radians
    model_pixels: np.ndarray  # (P,) detector pixels merged into the model
    size: int  # side of the EMC model grid
    friedel: bool


def read_emc_geometry(rep_paths) -> EMCGeometry:
    """The in-plane angles, merged pixels, grid size and Friedel flag of classify2d replicates
    (all replicates must agree: they are averaged together)."""
    from spiscape.io.replicate import read_replicate

    geo = None
    for path in rep_paths:
        rep = read_replicate(path, details=True)
        params = rep.params
        this = EMCGeometry(np.asarray(rep.angles, dtype=np.float64),
                           np.asarray(rep.model_pixels, dtype=np.int64),
                           int(rep.intens.shape[-1]), bool(params.get("friedel", False)))
        if params.get("sharpen_iterations", 0):
            raise InputError(path, "its averages were sharpened (classify2d "
                                   "--sharpen-iterations): they are not the bilinear merge that "
                                   "--emc-merge models; drop --emc-merge")
        if geo is None:
            geo = this
        elif (this.size != geo.size or this.friedel != geo.friedel
              or not np.array_equal(this.angles, geo.angles)
              or not np.array_equal(this.model_pixels, geo.model_pixels)):
            raise InputError(path, "EMC geometry (angles, pixels, grid, friedel) differs from "
                                   "the first replicate's")
    if geo is None:
        raise InputError("--replicates", "no replicate file")
    return geo


def merge_operator(detector, geo: EMCGeometry, out_size: int):
    """(q points (3, K P) float32 in voxels, scipy CSR (out_size^2, K P) float32): see the module
    docstring. ``out_size`` <= the EMC grid: the central crop (as ``spiscape averages`` makes)."""
    import scipy.sparse as sp

    from spiscape.emc import geometry, kernels

    if out_size > geo.size or (geo.size - out_size) % 2:
        raise InputError("--averages", f"averages of {out_size} px do not fit the EMC grid of "
                                       f"{geo.size} px centrally")
    mp = geo.model_pixels
    cx, cy = geometry.pixel_coords_2d(detector)
    if mp.size == 0 or mp.max() >= cx.size:
        raise InputError("--detector", f"the replicates merge pixels up to {mp.max()}, the "
                                       f"detector has {cx.size}")
    table = geometry.rotation_table(cx[mp], cy[mp], geo.angles, geo.size)
    view = kernels.view_operator(table.index, table.weight, geo.size)  # (K P, S^2)
    cover = np.asarray(view.sum(axis=0)).ravel()
    inv = np.where(cover > 1e-6 * cover.max(), 1.0 / np.maximum(cover, 1e-30), 0.0)
    merge = (sp.diags(inv) @ view.T).tocsr()  # (S^2, K P)
    if geo.friedel:  # the EMC averages every model with its point reflection
        flip = np.arange(geo.size**2)[::-1]
        merge = 0.5 * (merge + merge[flip])
    lo = (geo.size - out_size) // 2
    rows = (np.arange(lo, lo + out_size)[:, None] * geo.size
            + np.arange(lo, lo + out_size)[None, :]).ravel()
    merge = merge[rows].astype(np.float32).tocsr()
    q3 = np.stack([detector.qx, detector.qy, detector.qz]).astype(np.float64)[:, mp]
    points = []
    for angle in geo.angles:  # pixel t at angle k sits at rot_k(x_t) and shows I(R Rz(k) q_t)
        c, s = np.cos(angle), np.sin(angle)
        points.append(np.stack([c * q3[0] - s * q3[1], s * q3[0] + c * q3[1], q3[2]]))
    return np.concatenate(points, axis=1).astype(np.float32), merge
