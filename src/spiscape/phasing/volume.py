"""Particle volume of a phased density.

The phased density of a uniform particle is a plateau whose edges are blurred over about one
resolution element (the measured q range ends near Nyquist) and which rings a little (truncation
of the transform). The particle's surface is where the density crosses half the plateau: for a
flat face blurred by any symmetric kernel that is exactly the true surface, whatever the blur
width, so the volume enclosed does not depend on the resolution reached. Rules:

``integrated``         total mass / rho_plateau, rho_plateau the mean density of the particle's
                       core (voxels above half the plateau, eroded by ``erosion`` voxels, i.e.
                       about one resolution element in from the surface). Blurring and ringing
                       move mass about but conserve it, so this volume depends neither on the
                       resolution nor on the surface-to-volume ratio (cube versus sphere);
                       but the mass is that of the band-limited density with its negative
                       ringing clipped, which inflates it by about 10 % (cube +14 %, sphere +13
                       % on the simulator's truth volumes, 64^3, |q| in [3, 28] voxels).
``plateau`` (default)  voxels with rho >= fraction * rho_plateau, fraction = 0.5; rho_plateau is the
                       mass-weighted median density (half of the total mass lies in denser voxels),
                       which sits on the plateau and, unlike the maximum, ignores the Gibbs
                       overshoot at the edges and single noisy voxels. On the simulator's truth
                       volumes (cube, 20 melting levels, sphere) it is within -2.1 % to +4.6 % of
                       the true volume (one phasing of the cube, 4 starts, read +4.6 %, another
                       +1.6 %: start-to-start spread, not shape, dominates), so sphere / cube is
                       1.05-1.08 versus 1.10 there; 1.114 on the 48^3 test objects.
``max``                voxels with rho >= fraction * max(rho).
``mass``               the fewest (densest) voxels that hold ``fraction`` of the total mass. Kept
                       for comparison: for a particle with blurred edges the mass in the edge
                       depends on the blur and on the surface-to-volume ratio, so this rule mixes
                       resolution and shape into the volume (a cube and a sphere of equal volume
                       come out different by several per cent).

The threshold rules count voxels, those within a quarter of the threshold of it counted in
proportion (a linear ramp), which removes most of the staircase of whole-voxel counting.
The volume in nm^3 is that count times the real-space voxel (1 / (n dq))^3, dq the grid's q per
voxel in 1/nm.
"""

from __future__ import annotations

import numpy as np

from spiscape.errors import ConfigError

RULES = ("integrated", "plateau", "max", "mass")
DEFAULT_RULE = "plateau"
DEFAULT_FRACTION = {"integrated": 0.5, "plateau": 0.5, "max": 0.5, "mass": 0.9}
DEFAULT_EROSION = 2


def voxel_size_nm(grid_size: int, q_per_voxel_inv_nm: float) -> float:
    """Real-space voxel of an n-point grid whose q step is dq: 1 / (n dq)."""
    if not q_per_voxel_inv_nm or q_per_voxel_inv_nm <= 0 or not np.isfinite(q_per_voxel_inv_nm):
        raise ConfigError(f"q per voxel must be a positive number, got {q_per_voxel_inv_nm}")
    return 1.0 / (grid_size * q_per_voxel_inv_nm)


def plateau_density(density) -> float:
    """Mass-weighted median of the positive density: half of the mass lies in denser voxels."""
    values = np.sort(np.clip(np.asarray(density, dtype=np.float64).ravel(), 0, None))[::-1]
    cumulative = np.cumsum(values)
    if cumulative[-1] <= 0:
        return 0.0
    return float(values[np.searchsorted(cumulative, 0.5 * cumulative[-1])])


def threshold_value(density, rule: str = DEFAULT_RULE, fraction: float | None = None) -> float:
    """The density threshold of ``rule`` (see the module docstring)."""
    if rule not in RULES:
        raise ConfigError(f"unknown volume rule {rule!r} (choose from {', '.join(RULES)})")
    fraction = DEFAULT_FRACTION[rule] if fraction is None else float(fraction)
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"volume threshold fraction must lie in (0, 1), got {fraction}")
    rho = np.clip(np.asarray(density, dtype=np.float64), 0, None)
    if rule in ("plateau", "integrated"):
        return fraction * plateau_density(rho)
    if rule == "max":
        return fraction * float(rho.max(initial=0.0))
    values = np.sort(rho.ravel())[::-1]
    cumulative = np.cumsum(values)
    if cumulative[-1] <= 0:
        return 0.0
    return float(values[min(np.searchsorted(cumulative, fraction * cumulative[-1]),
                             values.size - 1)])


def particle_mask(density, rule: str = DEFAULT_RULE, fraction: float | None = None):
    """Boolean mask of the voxels inside the particle."""
    rho = np.asarray(density, dtype=np.float64)
    return rho >= threshold_value(rho, rule, fraction)


def core_density(rho, threshold: float, erosion: int = DEFAULT_EROSION) -> float:
    """Mean density of the voxels above ``threshold`` eroded by ``erosion`` voxels.

    Falls back to less erosion when the particle is too small to keep a core.
    """
    from scipy import ndimage

    inside = rho >= threshold
    for e in range(int(erosion), -1, -1):
        core = ndimage.binary_erosion(inside, iterations=e) if e > 0 else inside
        if core.any():
            return float(rho[core].mean())
    return float(threshold)


def particle_voxels(
    density, rule: str = DEFAULT_RULE, fraction: float | None = None,
    erosion: int = DEFAULT_EROSION,
) -> float:
    """Number of voxels in the particle (see the module docstring for the rules).

    Threshold rules: a voxel of density rho counts clip((rho - t) / (t / 2) + 1/2, 0, 1), so one
    at the threshold counts one half and those beyond t +- t / 4 fully or not at all.
    """
    rho = np.asarray(density, dtype=np.float64)
    t = threshold_value(rho, rule, fraction)
    if t <= 0:
        return 0.0
    if rule == "integrated":
        return float(np.clip(rho, 0, None).sum() / core_density(rho, t, erosion))
    if rule == "mass":
        return float(np.count_nonzero(rho >= t))
    width = 0.5 * t
    return float(np.clip((rho - t) / width + 0.5, 0.0, 1.0).sum())


def particle_volume_nm3(
    density,
    q_per_voxel_inv_nm: float,
    rule: str = DEFAULT_RULE,
    fraction: float | None = None,
    erosion: int = DEFAULT_EROSION,
) -> float:
    """Particle volume in nm^3 (area in nm^2 for 2D) of a density on an n^d grid with q step dq."""
    rho = np.asarray(density)
    voxel = voxel_size_nm(rho.shape[-1], q_per_voxel_inv_nm)
    return particle_voxels(rho, rule, fraction, erosion) * voxel**rho.ndim
