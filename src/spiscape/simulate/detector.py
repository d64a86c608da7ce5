"""Detector geometry in Dragonfly's convention.

The beam runs along +z and hits the detector at the centre of pixel (0, 0). A pixel at
(cx, cy) (binned pixels from the beam, x horizontal, y vertical) with the sample-detector
distance D (binned pixels) sees the scattered wave vector direction (cx, cy, D) / fac,
fac = sqrt(cx^2 + cy^2 + D^2). Its momentum transfer in units of the 3D grid's voxel, whose size
is the reciprocal-space size of one pixel at the detector centre (dq = pixel / (lambda D)), is

    q = ewald_rad * ((cx, cy, D) / fac - (0, 0, 1)),   ewald_rad = D,

so qz < 0 away from the centre (the Ewald sphere curves away from the incident beam) and
|q| = 2 sin(theta) / (lambda dq). Pixels are flattened row by row: pixel index = row * side + col,
row = cy + half, col = cx + half, so a frame reshaped to (side, side) is an image with x to the
right and y upwards in row order.
"""

from __future__ import annotations

import numpy as np

from spiscape.errors import ConfigError
from spiscape.io import Detector

#: h c in keV nm: lambda [nm] = HC_KEV_NM / E [keV]
HC_KEV_NM = 1.239841984

MASK_USED = 0
MASK_MERGED_ONLY = 1
MASK_BAD = 2


def wavelength_nm(energy_kev: float) -> float:
    """Photon wavelength in nm for a photon energy in keV."""
    if energy_kev <= 0:
        raise ConfigError(f"photon energy must be positive, got {energy_kev} keV")
    return HC_KEV_NM / energy_kev


def distance_px(distance_mm: float, pixel_um: float, binning: int = 1) -> float:
    """Sample-detector distance in (binned) pixels."""
    return distance_mm * 1e3 / (pixel_um * binning)


def q_per_voxel_inv_nm(
    distance_mm: float = 705.0, pixel_um: float = 200.0, energy_kev: float = 6.0, binning: int = 4
) -> float:
    """Reciprocal-space voxel size dq = pixel / (lambda D) in 1/nm (one binned pixel at the centre).

    The real-space box of an N^3 grid is L = 1 / dq and its voxel L / N.
    """
    return (pixel_um * binning * 1e-3) / (wavelength_nm(energy_kev) * distance_mm)


def real_space_voxel_nm(grid_size: int, **geometry) -> float:
    """Real-space voxel (nm) of an N^3 grid for a geometry (keywords of q_per_voxel_inv_nm)."""
    return 1.0 / (q_per_voxel_inv_nm(**geometry) * grid_size)


def max_radius_px(distance_mm: float, pixel_um: float, binning: int, max_angle_deg: float) -> float:
    """Radius in binned pixels of the circle of scattering angle max_angle_deg."""
    if not 0 < max_angle_deg < 90:
        raise ConfigError(f"max_angle_deg must lie in (0, 90), got {max_angle_deg}")
    return distance_px(distance_mm, pixel_um, binning) * np.tan(np.deg2rad(max_angle_deg))


def polarisation_factor(cx, cy, fac, polarisation: str = "x") -> np.ndarray:
    """Polarisation factor for a beam polarised along x or y, or "none" (unpolarised)."""
    if polarisation == "x":
        return 1.0 - (cx / fac) ** 2
    if polarisation == "y":
        return 1.0 - (cy / fac) ** 2
    if polarisation == "none":
        return 1.0 - 0.5 * (cx**2 + cy**2) / fac**2
    raise ConfigError(f"polarisation must be 'x', 'y' or 'none', got {polarisation!r}")


def make_detector(
    distance_mm: float = 705.0,
    pixel_um: float = 200.0,
    energy_kev: float = 6.0,
    max_angle_deg: float = 1.8,
    binning: int = 4,
    beamstop_px: float = 3.0,
    gap_px: int = 2,
    polarisation: str = "x",
    gap_offset_px: int | None = None,
) -> Detector:
    """A square detector covering the circle of max_angle_deg, in Dragonfly's convention.

    Mask: 0 inside the max-angle circle, 1 (merged only) in the square's corners beyond it,
    2 (bad) for the beamstop disc of radius beamstop_px and for a horizontal panel gap of gap_px
    rows starting gap_offset_px rows above the beam (default beamstop_px + 2), which makes the
    mask asymmetric about the beam as real panel gaps are. Lengths in binned pixels.
    """
    if binning < 1 or pixel_um <= 0 or distance_mm <= 0:
        raise ConfigError(
            f"detector needs distance_mm > 0, pixel_um > 0 and binning >= 1, got "
            f"{distance_mm}, {pixel_um}, {binning}"
        )
    if beamstop_px < 0 or gap_px < 0:
        raise ConfigError(f"beamstop_px and gap_px must be >= 0, got {beamstop_px}, {gap_px}")
    D = distance_px(distance_mm, pixel_um, binning)
    r_max = max_radius_px(distance_mm, pixel_um, binning, max_angle_deg)
    half = int(np.ceil(r_max))
    if half < 2:
        raise ConfigError(
            f"max_angle_deg={max_angle_deg} covers only {r_max:.2f} binned pixels; "
            "lower the binning or raise the angle"
        )
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    cy, cx = np.meshgrid(offsets, offsets, indexing="ij")
    cx, cy = cx.ravel(), cy.ravel()
    fac = np.sqrt(cx**2 + cy**2 + D**2)
    ewald_rad = D
    qx = cx * ewald_rad / fac
    qy = cy * ewald_rad / fac
    qz = ewald_rad * (D / fac - 1.0)
    corr = (D / fac) ** 3 * polarisation_factor(cx, cy, fac, polarisation)

    radius = np.hypot(cx, cy)
    mask = np.where(radius <= r_max, MASK_USED, MASK_MERGED_ONLY).astype(np.uint8)
    mask[radius <= beamstop_px] = MASK_BAD
    if gap_px > 0:
        start = int(np.ceil(beamstop_px)) + 2 if gap_offset_px is None else int(gap_offset_px)
        mask[(cy >= start) & (cy < start + gap_px)] = MASK_BAD
    return Detector(
        qx=qx, qy=qy, qz=qz, corr=corr, mask=mask, detd=float(D), ewald_rad=float(ewald_rad)
    )


def detector_side(det: Detector) -> int:
    """Side length of the square pixel grid of a detector made by make_detector."""
    side = int(round(np.sqrt(det.qx.size)))
    if side * side != det.qx.size:
        raise ValueError(f"detector with {det.qx.size} pixels is not square")
    return side


def q_magnitude(det: Detector) -> np.ndarray:
    """|q| of every pixel in voxel units."""
    return np.sqrt(det.qx**2 + det.qy**2 + det.qz**2)
