"""Detector geometry files in Dragonfly's format: per-pixel q vectors, corrections and mask.

Format
------
A detector is a flat list of ``num_pix`` pixels. For each pixel:

``qx qy qz``  float64, the pixel's scattering vector in *voxel* units (the 3D grid the model lives
              on), origin at the direct beam. For a pixel at ``(x, y)`` on a flat detector at
              distance ``detd`` (both in pixels) and ``L = sqrt(x² + y² + detd²)``::

                  q = ewald_rad * (x / L, y / L, detd / L - 1)

              so ``qz <= 0``; some Dragonfly files use the opposite sign of ``qz`` (see
              :meth:`Detector.coords_2d`).
``corr``      float64, the product of the pixel's solid angle and polarisation factor.
``mask``      uint8: 0 = used everywhere, 1 = used in merging only (e.g. the corners outside the
              resolution circle), 2 = bad, never used.

and two scalars: ``detd``, the detector distance in pixels, and ``ewald_rad``, the radius of the
Ewald sphere in voxels.

HDF5 (``.h5``/``.hdf5``; recognised on read by the HDF5 signature, not the suffix)
    datasets ``qx qy qz corr`` (f8, shape ``(num_pix,)``), ``mask`` (u1, ``(num_pix,)``), and
    scalar datasets ``detd`` and ``ewald_rad`` (f8, shape ``()``; shape ``(1,)`` accepted on
    read). Optional ``background`` (f8, ``(num_pix,)``): an expected background per pixel, read
    when present and written when set.

ASCII (``.dat``, any other suffix on write)
    first line ``num_pix detd ewald_rad`` (``%d %.6f %.6f``), then one line per pixel
    ``qx qy qz corr mask`` (``%21.15e %21.15e %21.15e %21.15e %d``). Old-style files have only
    ``num_pix`` on the first line; their ``detd`` and ``ewald_rad`` must be given by the caller.
    The ASCII format has no background.

Pixel order is the order of the photon files' pixel indices. A detector for dense CXI frames of
shape ``(ny, nx)`` lists its pixels row-major: pixel ``iy * nx + ix``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from spiscape.errors import InputError
from spiscape.utils.atomic import atomic_path

log = logging.getLogger(__name__)

HDF5_SUFFIXES = (".h5", ".hdf5")
_PIXEL_ARRAYS = ("qx", "qy", "qz", "corr", "mask")
_ASCII_FORMAT = "%21.15e %21.15e %21.15e %21.15e %d"


@dataclass(eq=False)
class Detector:
    """Pixel geometry of a detector; every per-pixel array has shape ``(num_pix,)``."""

    qx: np.ndarray
    qy: np.ndarray
    qz: np.ndarray
    corr: np.ndarray
    mask: np.ndarray
    detd: float
    ewald_rad: float
    background: np.ndarray | None = None

    def __post_init__(self):
        for name in ("qx", "qy", "qz", "corr"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        self.mask = np.asarray(self.mask)
        if self.background is not None:
            self.background = np.asarray(self.background, dtype=np.float64)
        self.detd = float(self.detd)
        self.ewald_rad = float(self.ewald_rad)

    @property
    def num_pix(self) -> int:
        return int(self.qx.shape[0])

    def coords_2d(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates ``(cx, cy)`` on a flat detector, in pixels, origin at the beam.

        Projects ``q`` back through the Ewald sphere: ``c = q * detd / (ewald_rad + qz)``. Files
        whose ``qz`` is mostly positive use the other sign convention, so ``ewald_rad - qz`` is
        used for them, as Dragonfly does.
        """
        if self.qz.size and self.qz.mean() > 0:
            denominator = self.ewald_rad - self.qz
        else:
            denominator = self.ewald_rad + self.qz
        return self.qx * self.detd / denominator, self.qy * self.detd / denominator

    def assemble(self, values, fill=np.nan) -> np.ndarray:
        """Place per-pixel ``values`` (shape ``(..., num_pix)``) on a 2D image for figures.

        Each pixel goes to the integer grid point ``(round(cy), round(cx))``; the image has shape
        ``(..., ny, nx)`` with odd ``ny``, ``nx`` and the beam at the centre ``(ny // 2, nx // 2)``.
        Rows are ``y`` and columns ``x``, so ``plt.imshow(image, origin="lower")`` shows ``x``
        to the right. Grid points without a pixel hold ``fill``; where pixels share a grid point
        the last one wins.
        """
        values = np.asarray(values)
        if values.shape[-1:] != (self.num_pix,):
            raise ValueError(
                f"values have shape {values.shape}; the last axis must be {self.num_pix}"
            )
        cx, cy = self.coords_2d()
        ix = np.rint(cx).astype(np.int64)
        iy = np.rint(cy).astype(np.int64)
        half_x = int(np.abs(ix).max()) if ix.size else 0
        half_y = int(np.abs(iy).max()) if iy.size else 0
        dtype = np.result_type(values.dtype, np.asarray(fill).dtype)
        image = np.full(values.shape[:-1] + (2 * half_y + 1, 2 * half_x + 1), fill, dtype=dtype)
        image[..., iy + half_y, ix + half_x] = values
        return image

    def validate(self, path: str | os.PathLike | None = None) -> None:
        """Raise :class:`InputError` (naming ``path``) unless the geometry is usable."""

        def fail(problem: str):
            raise InputError(path, problem)

        if self.qx.ndim != 1:
            fail(f"qx must be one value per pixel, got shape {self.qx.shape}")
        num_pix = self.num_pix
        if num_pix == 0:
            fail("the detector has no pixels")
        arrays = {name: getattr(self, name) for name in _PIXEL_ARRAYS}
        if self.background is not None:
            arrays["background"] = self.background
        for name, array in arrays.items():
            if array.shape != (num_pix,):
                fail(f"{name} has shape {array.shape} but qx has {num_pix} pixels")
        for name in ("qx", "qy", "qz", "corr"):
            _require(np.isfinite(arrays[name]), path, f"{name} is not finite (NaN or inf)")
        _require(self.corr >= 0, path, "corr (solid angle x polarisation) is negative")
        mask = self.mask
        if mask.dtype.kind not in "biuf":
            fail(f"mask has non-numeric type {mask.dtype}")
        _require(
            np.isin(mask, (0, 1, 2)),
            path,
            "mask value is not 0 (used), 1 (merged only) or 2 (bad)",
            show_value=mask,
        )
        if self.background is not None:
            _require(
                np.isfinite(self.background) & (self.background >= 0),
                path,
                "background is negative or not finite",
            )
        for name in ("detd", "ewald_rad"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                fail(f"{name} must be a positive number, got {value}")


def _require(good: np.ndarray, path, problem: str, show_value: np.ndarray | None = None) -> None:
    """Raise InputError naming the first pixel where ``good`` is False."""
    if good.all():
        return
    pixel = int(np.argmin(good))
    value = "" if show_value is None else f" ({show_value[pixel]})"
    raise InputError(path, f"pixel {pixel}: {problem}{value}")


def read_detector(
    path: str | os.PathLike, detd: float | None = None, ewald_rad: float | None = None
) -> Detector:
    """Read a Dragonfly detector file (HDF5 or ASCII, told apart by the HDF5 signature).

    ``detd`` and ``ewald_rad`` are used only where the file does not record them (old-style ASCII
    files with just ``num_pix`` on the first line). Any problem raises :class:`InputError`.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a directory, not a detector file")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise InputError(path, f"cannot open: {_first_line(exc)}") from exc
    if is_hdf5:
        det = _read_hdf5(path, detd, ewald_rad)
    else:
        det = _read_ascii(path, detd, ewald_rad)
    det.validate(path)
    det.mask = det.mask.astype(np.uint8)
    log.debug("read detector %s: %d pixels, detd %g, ewald_rad %g", path, det.num_pix, det.detd,
              det.ewald_rad)
    return det


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__


def _read_hdf5(path: Path, detd, ewald_rad) -> Detector:
    try:
        with h5py.File(path, "r") as f:
            arrays = {}
            for name in _PIXEL_ARRAYS:
                dset = f.get(name)
                if not isinstance(dset, h5py.Dataset):
                    raise InputError(path, f"missing dataset '{name}'")
                if dset.ndim != 1:
                    raise InputError(path, f"'{name}' has shape {dset.shape}, expected (num_pix,)")
                if dset.dtype.kind not in "biuf":
                    raise InputError(path, f"'{name}' holds {dset.dtype}, not numbers")
                arrays[name] = dset[()]
            scalars = {}
            for name, given in (("detd", detd), ("ewald_rad", ewald_rad)):
                dset = f.get(name)
                if dset is None and given is not None:
                    scalars[name] = given
                    continue
                if not isinstance(dset, h5py.Dataset):
                    raise InputError(path, f"missing dataset '{name}'")
                if dset.size != 1 or dset.ndim > 1 or dset.dtype.kind not in "iuf":
                    raise InputError(path, f"'{name}' must be a single number, got {dset.shape}")
                scalars[name] = float(np.asarray(dset[()]).reshape(()))
            background = None
            if "background" in f:
                dset = f["background"]
                if not isinstance(dset, h5py.Dataset) or dset.dtype.kind not in "iuf":
                    raise InputError(path, "'background' is not a numeric dataset")
                background = dset[()]
    except InputError:
        raise
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise InputError(path, f"unreadable HDF5 detector ({_first_line(exc)})") from exc
    return Detector(**arrays, **scalars, background=background)


def _read_ascii(path: Path, detd, ewald_rad) -> Detector:
    with open(path, "rb") as f:
        first = f.readline(4096)
    if not first:
        raise InputError(path, "empty file")
    try:
        header = first.decode("ascii").split()
    except UnicodeDecodeError:
        raise InputError(path, "not a detector file: neither HDF5 nor ASCII text") from None
    if len(header) not in (1, 3):
        raise InputError(
            path, f"header line has {len(header)} fields, expected 'num_pix detd ewald_rad'"
        )
    try:
        num_pix = int(header[0])
        values = [float(v) for v in header[1:]]
    except ValueError:
        raise InputError(path, f"header line is not numeric: {first.decode().strip()!r}") from None
    if num_pix <= 0:
        raise InputError(path, f"header says {num_pix} pixels")
    if values:
        detd, ewald_rad = values
    elif detd is None or ewald_rad is None:
        raise InputError(
            path, "old-style detector file without detd and ewald_rad; give both to read it"
        )
    table = _read_ascii_table(path, num_pix)
    qx, qy, qz, corr, mask = table.T
    fractional = mask != np.rint(mask)
    if fractional.any():
        pixel = int(np.argmax(fractional))
        raise InputError(path, f"pixel {pixel}: mask value is not 0, 1 or 2 ({mask[pixel]})")
    return Detector(qx, qy, qz, corr, mask, detd, ewald_rad)


def _read_ascii_table(path: Path, num_pix: int) -> np.ndarray:
    try:
        table = np.loadtxt(path, dtype=np.float64, skiprows=1, ndmin=2, comments=None)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(path, _find_bad_line(path) or f"unreadable ({_first_line(exc)})") from exc
    if table.shape[0] and table.shape[1] != 5:
        raise InputError(
            path, f"line 2 has {table.shape[1]} columns, expected 5 (qx qy qz corr mask)"
        )
    if table.shape[0] != num_pix:
        raise InputError(
            path, f"header says {num_pix} pixels but the file has {table.shape[0]} pixel lines"
        )
    return table.reshape(num_pix, 5)


def _find_bad_line(path: Path) -> str | None:
    """Describe the first malformed pixel line (only called once parsing has failed)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1:
                continue
            try:
                fields = raw.decode("ascii").split()
            except UnicodeDecodeError:
                return f"line {number} is not ASCII text"
            if not fields:
                continue
            if len(fields) != 5:
                return f"line {number} has {len(fields)} columns, expected 5 (qx qy qz corr mask)"
            try:
                [float(v) for v in fields]
            except ValueError:
                return f"line {number} is not numeric: {raw.decode().strip()[:60]!r}"
    return None


def write_detector(det: Detector, path: str | os.PathLike) -> None:
    """Write ``det`` atomically: HDF5 for ``.h5``/``.hdf5``, the ASCII ``.dat`` format otherwise."""
    det.validate()
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() in HDF5_SUFFIXES:
            with h5py.File(tmp, "w") as f:
                for name in ("qx", "qy", "qz", "corr"):
                    f.create_dataset(name, data=getattr(det, name).astype(np.float64))
                f.create_dataset("mask", data=det.mask.astype(np.uint8))
                f.create_dataset("detd", data=np.float64(det.detd))
                f.create_dataset("ewald_rad", data=np.float64(det.ewald_rad))
                if det.background is not None:
                    f.create_dataset("background", data=det.background.astype(np.float64))
        else:
            if det.background is not None:
                log.warning("%s: the ASCII detector format has no background; not written", path)
            table = np.column_stack([det.qx, det.qy, det.qz, det.corr, det.mask.astype(np.float64)])
            with open(tmp, "w") as f:
                f.write(f"{det.num_pix} {det.detd:.6f} {det.ewald_rad:.6f}\n")
                np.savetxt(f, table, fmt=_ASCII_FORMAT)
