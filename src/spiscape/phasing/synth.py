"""Training volumes for the neural phaser: random particles and their intensities as the
pipeline hands them to phasing.

A sample is a uniform particle (gold: density 1 inside, partial volumes at the surface, voxel
= 1 real-space voxel of the phasing grid) of one of six kinds: cube, superball along the melting
series (random t), sphere, dimer of two touching spheres (radius ratio 0.6-1, so not always
centrosymmetric), rod (aspect 2-5) and spheroid (axis ratio 0.5-2); its largest extent fills
``size_min``-``size_max`` of the box. It lies on the grid axes (``aligned_fraction`` of the
samples, as the VAE's oriented volumes do) or is rotated at random (linear interpolation). Then
what a decoded or merged volume suffers: a Gaussian blur of the density (the resolution of a VAE
volume; the target is the blurred density, which is what the measured amplitudes describe), a
Gaussian smoothing of the intensity (a size spread washes out the fringes), multiplicative
log-normal noise, the m-3m average of the intensity for an aligned particle of cubic symmetry
(the VAE's point group), and a measured shell q_min <= |q| <= q_max (beamstop and detector edge
left unmeasured). Every random choice comes from ``numpy.random.default_rng((seed, index))``,
so sample ``index`` of a seed is the same on every machine and a resumed training sees the same
data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from spiscape.errors import ConfigError
from spiscape.phasing.align import centred_radius
from spiscape.simulate import shapes as sh

KINDS = ("cube", "superball", "sphere", "dimer", "rod", "spheroid")
#: kinds whose aligned intensity has the cube's point group (m-3m)
CUBIC = ("cube", "superball", "sphere")


@dataclass
class SynthSettings:
    grid: int = 61
    size_min: float = 0.05  # largest extent / box side
    size_max: float = 0.45
    aligned_fraction: float = 0.5
    blur_max: float = 1.2  # voxels: Gaussian blur (sigma) of the density
    smooth_max: float = 0.6  # voxels: Gaussian smoothing (sigma) of the intensity
    noise_max: float = 0.2  # sigma of the log-normal intensity noise
    q_min_max: float = 5.0  # beamstop radius drawn in [0, q_min_max] voxels
    q_max_fraction: tuple[float, float] = (0.30, 0.50)  # q_max / grid side

    def check(self) -> SynthSettings:
        if self.grid < 16:
            raise ConfigError(f"grid: {self.grid} is too small for the neural phaser (>= 16)")
        if not 0 < self.size_min < self.size_max <= 2 * (self.grid // 4 - 1) / self.grid:
            raise ConfigError(
                f"size_min, size_max: need 0 < size_min < size_max <= "
                f"{2 * (self.grid // 4 - 1) / self.grid:.2f} (a particle wider than half the "
                f"box cannot be phased: its autocorrelation wraps around)")
        lo, hi = self.q_max_fraction
        if not 0 < lo <= hi <= 0.5:
            raise ConfigError("q_max_fraction: need 0 < low <= high <= 0.5")
        return self

    def as_dict(self) -> dict:
        out = asdict(self)
        out["q_max_fraction"] = list(self.q_max_fraction)
        return out


@dataclass
class Sample:
    density: np.ndarray  # (N, N, N) float32, blurred, max 1, centre of mass at N // 2
    intens: np.ndarray  # (N, N, N) float32, centred (q = 0 at N // 2), unmeasured voxels kept
    measured: np.ndarray  # (N, N, N) bool
    kind: str


def _two_spheres(r1: float, r2: float):
    """Signed distance of two touching spheres along x, centre of mass at the origin."""
    x1 = -(r1 + r2) * r2**3 / (r1**3 + r2**3)
    x2 = x1 + r1 + r2

    def distance(x, y, z):
        yz = y**2 + z**2
        return np.minimum(np.sqrt((x - x1) ** 2 + yz) - r1, np.sqrt((x - x2) ** 2 + yz) - r2)

    return distance, max(abs(x1) + r1, x2 + r2)


def particle(kind: str, extent: float, grid: int, rng: np.random.Generator) -> np.ndarray:
    """A uniform particle of largest extent ``extent`` voxels on the grid axes, centred."""
    kw = dict(grid_size=grid, voxel_nm=1.0)
    half = extent / 2.0
    if kind == "cube":
        return sh.cube_density(extent / np.sqrt(3.0), **kw)
    if kind == "superball":
        p = float(sh.superball_exponent(rng.uniform(0.0, 1.0)))
        return sh.superball_density(half / 3 ** (0.5 - 1 / p), p, **kw)
    if kind == "sphere":
        return sh.sphere_density(extent, **kw)
    if kind == "dimer":
        ratio = rng.uniform(0.6, 1.0)
        r1 = half / (1.0 + ratio)  # the pair's length 2 (r1 + r2) is the extent
        distance, reach = _two_spheres(r1, ratio * r1)
        return sh.voxelise(distance, reach, grid, 1.0, mirror=False)
    if kind == "rod":
        aspect = rng.uniform(2.0, 5.0)
        diameter = extent / np.hypot(aspect, 1.0)
        return sh.rod_density(aspect * diameter, diameter, **kw)
    if kind == "spheroid":
        ratio = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))  # polar / equatorial
        a = half / max(ratio, 1.0)
        c = a * ratio

        def distance(x, y, z):
            # first-order distance to the ellipsoid (exact on the axes), enough near the surface
            u = np.sqrt((x / a) ** 2 + (y / a) ** 2 + (z / c) ** 2)
            return (u - 1.0) * min(a, c)

        return sh.voxelise(distance, max(a, c), grid, 1.0)
    raise ConfigError(f"unknown particle kind {kind!r} (choose from {', '.join(KINDS)})")


def rotate(density: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The density turned by a uniformly random rotation about the grid centre (linear)."""
    matrix = Rotation.random(random_state=rng).as_matrix()
    centre = np.full(3, density.shape[0] // 2, dtype=np.float64)
    offset = centre - matrix @ centre
    return ndimage.affine_transform(density, matrix, offset=offset, order=1, mode="constant")


def centre_of_mass_roll(density: np.ndarray) -> np.ndarray:
    """Whole-voxel roll putting the centre of mass at N // 2."""
    com = np.array(ndimage.center_of_mass(np.maximum(density, 0)))
    shift = np.rint(density.shape[0] // 2 - com).astype(int)
    return np.roll(density, tuple(shift), axis=(0, 1, 2))


def cubic_average(volume: np.ndarray) -> np.ndarray:
    """Average of a centred cubic volume over the 48 operations of m-3m (axis permutations and
    flips about index N // 2)."""
    from itertools import permutations, product

    n = volume.shape[0]
    total = np.zeros_like(volume, dtype=np.float64)
    for perm in permutations(range(3)):
        turned = np.transpose(volume, perm)
        for flips in product((False, True), repeat=3):
            out = turned
            for axis, flip in enumerate(flips):
                if flip:
                    out = np.flip(out, axis)
                    if n % 2 == 0:  # keep index n // 2 in place on an even grid
                        out = np.roll(out, 1, axis)
            total += out
    return total / 48.0


def gaussian_transfer(shape, sigma: float) -> np.ndarray:
    """exp(-2 pi^2 sigma^2 |k|^2) on fftn's grid (k in cycles per voxel): a Gaussian blur."""
    k = np.meshgrid(*[np.fft.fftfreq(n) for n in shape], indexing="ij")
    return np.exp(-2.0 * np.pi**2 * sigma**2 * sum(g * g for g in k))


def sample(settings: SynthSettings, seed: int, index: int) -> Sample:
    """Training sample ``index`` of ``seed`` (see the module docstring)."""
    s = settings
    rng = np.random.default_rng((int(seed), int(index)))
    n = s.grid
    kind = KINDS[int(rng.integers(len(KINDS)))]
    extent = rng.uniform(s.size_min, s.size_max) * n
    density = particle(kind, extent, n, rng)
    aligned = rng.random() < s.aligned_fraction
    if not aligned:
        density = rotate(density, rng)
    density = centre_of_mass_roll(density)
    spec = np.fft.fftn(np.fft.ifftshift(density))
    spec *= gaussian_transfer(density.shape, rng.uniform(0.0, s.blur_max))
    blurred = np.fft.fftshift(np.fft.ifftn(spec).real)
    intens = np.fft.fftshift(np.abs(spec) ** 2)
    smooth = rng.uniform(0.0, s.smooth_max)
    if smooth > 0.05:
        intens = ndimage.gaussian_filter(intens, smooth, mode="constant")
    noise = rng.uniform(0.0, s.noise_max)
    intens = intens * np.exp(noise * rng.standard_normal(intens.shape) - noise**2 / 2)
    if aligned and kind in CUBIC:
        intens = cubic_average(intens)
    q = centred_radius(intens.shape)
    q_min = rng.uniform(0.0, s.q_min_max)
    q_max = min(rng.uniform(*s.q_max_fraction) * n, n // 2)
    measured = (q >= q_min) & (q <= q_max)
    peak = float(blurred.max())
    return Sample(density=(blurred / peak).astype(np.float32), intens=intens.astype(np.float32),
                  measured=measured, kind=kind)
