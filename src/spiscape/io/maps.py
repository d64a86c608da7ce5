"""MRC maps for ChimeraX / Chimera / cryoDRGN users.

Real-space densities (``spiscape phase --mrc-dir``, the workflow's ``results/<ds>/maps/``):
``density_000.mrc`` … one per phased volume, float32, voxel size in Å (the MRC convention; the
grid's real-space voxel 1 / (n Δq)), the particle rolled to the middle of the box (phase
retrieval leaves it anywhere, periodically) and the origin set so that voxel n // 2 sits at
(0, 0, 0) Å, and the map's provenance in the header labels (spiscape version, source
file, index and latent point). ``z_values.txt`` beside them holds one line per map, the latent
coordinates in the files' order (as cryoDRGN's ``analyze`` writes beside its volumes).

Reciprocal-space intensities (``spiscape vae``: ``vae/volumes/``): ``intensity_000.mrc`` …,
named so: the header's voxel size holds Δq in 1/nm (the format calls the unit Å; the labels say
"reciprocal space" and the unit), the beam at the centre voxel, and the same ``z_values.txt``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spiscape.utils.atomic import atomic_path

#: MRC header labels hold at most 10 lines of 80 characters
_LABEL_CHARS = 80


def centred(density: np.ndarray) -> np.ndarray:
    """``density`` rolled (periodically, as phase retrieval leaves it) so that its centre of
    mass sits at voxel n // 2 on every axis: a particle split across the box edges comes out
    whole in the middle of the map. The circular mean of each axis's mass distribution (the
    phase of its first Fourier coefficient) is that centre."""
    out = np.asarray(density)
    weight = np.clip(out, 0, None)
    for axis, n in enumerate(out.shape):
        profile = weight.sum(axis=tuple(a for a in range(out.ndim) if a != axis))
        if profile.sum() <= 0:
            continue
        angle = np.angle(np.sum(profile * np.exp(2j * np.pi * np.arange(n) / n)))
        centre = (angle % (2 * np.pi)) * n / (2 * np.pi)
        out = np.roll(out, n // 2 - int(round(centre)), axis=axis)
    return out


def _labels(lines) -> list[bytes]:
    return [line.encode("ascii", "replace")[:_LABEL_CHARS] for line in lines][:10]


def write_maps(directory, volumes, z, *, kind: str, voxel: float | None, source: str = "",
               indices=None) -> list[Path]:
    """Write one MRC per volume of ``volumes`` (K, n, n, n) and ``z_values.txt`` into
    ``directory`` (replaced files only; others left). ``kind`` "density" (``voxel`` in nm,
    stored in Å) or "intensity" (``voxel`` = Δq in 1/nm). Returns the map paths."""
    import mrcfile

    from spiscape import __version__

    if kind not in ("density", "intensity"):
        raise ValueError(f"kind must be 'density' or 'intensity', got {kind!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    volumes = np.asarray(volumes)
    z = np.asarray(z, dtype=np.float64).reshape(len(volumes), -1)
    indices = list(range(len(volumes))) if indices is None else list(indices)
    paths = []
    for k, vol in enumerate(volumes):
        path = directory / f"{kind}_{k:03d}.mrc"
        n = np.asarray(vol.shape)
        with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as m:
            data = centred(vol) if kind == "density" else vol
            m.set_data(np.ascontiguousarray(data, dtype=np.float32))
            if kind == "density" and voxel and np.isfinite(voxel):
                angstrom = 10.0 * float(voxel)
                m.voxel_size = angstrom
                # MRC axes x, y, z are the array's last, middle, first
                centre = (n // 2)[::-1] * angstrom
                m.header.origin = (-centre[0], -centre[1], -centre[2])
                scale = f"voxel {angstrom:.4g} A, centre at the origin"
            elif kind == "intensity" and voxel and np.isfinite(voxel):
                m.voxel_size = float(voxel)
                scale = f"reciprocal space: voxel {float(voxel):.4g} 1/nm, beam at the centre"
            else:
                scale = "voxel size unknown (no q scale)"
            lines = [f"spiscape {__version__} {kind} map {k} of {len(volumes)}",
                     f"source {source}"[-_LABEL_CHARS:],
                     f"index {indices[k]} latent " + " ".join(f"{v:.5g}" for v in z[k]),
                     scale]
            labels = _labels(lines)
            m.header.nlabl = len(labels)
            for i, label in enumerate(labels):
                m.header.label[i] = label
        paths.append(path)
    with atomic_path(directory / "z_values.txt") as tmp:
        np.savetxt(tmp, z, fmt="%.6g")
    return paths
