"""Open a slide file with the right backend and expose it as a lazy pyramid."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from napari_pathology.slide.backends import (
    ImageBackend,
    OpenSlideBackend,
    SlideBackend,
    SlideOpenError,
    SlideReadError,
    TiffBackend,
    UnsupportedFormatError,
)

#: File endings OpenSlide reads (vendor formats, generic tiled TIFF, DICOM WSI).
OPENSLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide",
    ".dcm",
)  # fmt: skip
#: File endings read through tifffile when OpenSlide does not (OME-TIFF, SubIFD pyramids).
TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf8", ".tf2")
#: Plain single-level images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Everything :func:`open_slide` accepts.
SUPPORTED_SUFFIXES = tuple(dict.fromkeys(OPENSLIDE_SUFFIXES + TIFF_SUFFIXES + IMAGE_SUFFIXES))

#: Grey shown where a tile could not be decoded (never white: that means "no tissue").
UNREADABLE_FILL = 190

#: Smallest chunk side; files with tiny tiles get chunks of several tiles.
MIN_CHUNK = 256


def is_supported_path(path: str | Path) -> bool:
    """Whether the file name has an ending some backend reads (a cheap probe, no I/O)."""
    return str(path).lower().endswith(SUPPORTED_SUFFIXES)


@dataclass(frozen=True)
class SlideInfo:
    """The facts of an opened slide, as shown in the Slide panel and ``info``."""

    name: str
    path: str | None
    backend: str
    vendor: str
    width: int
    height: int
    levels: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    tile_sizes: tuple[tuple[int, int], ...]
    mpp_x: float | None
    mpp_y: float | None
    mpp_source: str
    mpp_note: str
    objective_power: float | None
    associated_images: tuple[str, ...] = field(default_factory=tuple)

    @property
    def size_mm(self) -> tuple[float, float] | None:
        """Physical ``(width, height)`` in millimetres, None without um/px."""
        if self.mpp_x is None or self.mpp_y is None:
            return None
        return self.width * self.mpp_x / 1000.0, self.height * self.mpp_y / 1000.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (tuples become lists)."""
        data = asdict(self)
        data["level_dimensions"] = [list(d) for d in self.level_dimensions]
        data["level_downsamples"] = list(self.level_downsamples)
        data["tile_sizes"] = [list(t) for t in self.tile_sizes]
        data["associated_images"] = list(self.associated_images)
        return data


class Slide:
    """An opened whole-slide image: facts, region reads and a lazy dask pyramid.

    Parameters
    ----------
    backend : SlideBackend
        The reader that provides pixels.
    mpp : float, optional
        A user-given um/px that overrides (or supplies) the file's value.

    Examples
    --------
    >>> from napari_pathology.slide import InMemoryBackend, Slide
    >>> import numpy as np
    >>> slide = Slide(InMemoryBackend([np.zeros((512, 768, 3), np.uint8)], mpp=0.5))
    >>> slide.info().width, slide.pyramid()[0].shape
    (768, (512, 768, 3))

    """

    def __init__(self, backend: SlideBackend, mpp: float | None = None) -> None:
        self.backend = backend
        self._mpp_override: float | None = None
        self._pyramid: list[da.Array] | None = None
        if mpp is not None:
            self.set_mpp(mpp)

    # ------------------------------------------------------------------ facts
    @property
    def path(self) -> str | None:
        """Path of the file (None for in-memory slides)."""
        return self.backend.path

    @property
    def name(self) -> str:
        """File name, or a description of an in-memory slide."""
        return Path(self.path).name if self.path else f"<{self.backend.name} slide>"

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.backend.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in pixels."""
        return self.backend.level_dimensions[0]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of every level."""
        return self.backend.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample factor of every level relative to level 0."""
        return self.backend.level_downsamples

    @property
    def mpp(self) -> tuple[float, float] | None:
        """Level-0 ``(mpp_x, mpp_y)`` in micrometres per pixel, or None when unknown."""
        if self._mpp_override is not None:
            return self._mpp_override, self._mpp_override
        return self.backend.mpp

    @property
    def mpp_source(self) -> str:
        """``"file"``, ``"user"`` (set with :meth:`set_mpp`) or ``"missing"``."""
        if self._mpp_override is not None:
            return "user"
        return "file" if self.backend.mpp else "missing"

    def set_mpp(self, mpp: float | None) -> None:
        """Override the file's um/px (``None`` goes back to the file's value).

        Raises
        ------
        ValueError
            For a value that is not a positive finite number.

        """
        if mpp is not None and (not math.isfinite(mpp) or mpp <= 0):
            raise ValueError(f"um/px must be a positive number, got {mpp!r}")
        self._mpp_override = None if mpp is None else float(mpp)

    def require_mpp(self) -> tuple[float, float]:
        """The um/px, or a clear error telling the user how to supply it."""
        if self.mpp is None:
            raise SlideOpenError(
                f"{self.name} has no um/px ({self.backend.mpp_note}); set it in the Slide panel or pass --mpp"
            )
        return self.mpp

    def info(self) -> SlideInfo:
        """The slide's facts."""
        b = self.backend
        mpp = self.mpp
        note = "set by the user" if self.mpp_source == "user" else b.mpp_note
        return SlideInfo(
            name=self.name,
            path=self.path,
            backend=b.name,
            vendor=b.vendor,
            width=self.dimensions[0],
            height=self.dimensions[1],
            levels=self.level_count,
            level_dimensions=tuple(b.level_dimensions),
            level_downsamples=tuple(round(d, 6) for d in b.level_downsamples),
            tile_sizes=tuple(b.tile_sizes),
            mpp_x=mpp[0] if mpp else None,
            mpp_y=mpp[1] if mpp else None,
            mpp_source=self.mpp_source,
            mpp_note=note,
            objective_power=b.objective_power,
            associated_images=tuple(b.associated_image_names),
        )

    # ------------------------------------------------------------------ pixels
    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Read ``(height, width, 3)`` RGB uint8 at ``level`` and level coordinates ``(x, y)``."""
        return self.backend.read_region(level, x, y, width, height)

    def read_associated_image(self, name: str) -> np.ndarray:
        """Read an associated image (``label``, ``macro``, ``thumbnail``...)."""
        return self.backend.read_associated_image(name)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The highest-resolution level not finer than ``downsample`` needs.

        A small tolerance accepts levels whose factor is a hair above the
        request (e.g. 4.016 for 4).
        """
        best = 0
        for level, factor in enumerate(self.level_downsamples):
            if factor <= downsample * 1.01:
                best = level
        return best

    def validate(self) -> None:
        """Decode one tile of the smallest level to prove the pixel data is readable.

        Raises
        ------
        SlideReadError
            When the file opens but its tiles cannot be decoded.

        """
        level = self.level_count - 1
        width, height = self.level_dimensions[level]
        tile_w, tile_h = self.backend.tile_sizes[level]
        self.read_region(level, 0, 0, max(1, min(width, tile_w)), max(1, min(height, tile_h)))

    def pyramid(self, on_error: Callable[[SlideReadError], None] | None = None) -> list[da.Array]:
        """Every level as a lazy ``(height, width, 3)`` uint8 dask array.

        Chunks follow the file's own tile grid (several tiles per chunk when
        tiles are smaller than 256 px), and building the arrays reads no pixel.

        Parameters
        ----------
        on_error : callable, optional
            Without it, an undecodable tile raises :class:`SlideReadError` at
            compute time. With it, the error is passed to ``on_error`` and the
            chunk is filled with grey, so a viewer keeps working on a partly
            corrupt file.

        Returns
        -------
        list of dask.array.Array
            Level 0 first.

        """
        if on_error is None and self._pyramid is not None:
            return self._pyramid
        levels = [self._level_array(level, on_error) for level in range(self.level_count)]
        if on_error is None:
            self._pyramid = levels
        return levels

    def _level_array(self, level: int, on_error: Callable[[SlideReadError], None] | None) -> da.Array:
        width, height = self.level_dimensions[level]
        tile_w, tile_h = self.backend.tile_sizes[level]
        chunk_w = tile_w * max(1, math.ceil(MIN_CHUNK / tile_w))
        chunk_h = tile_h * max(1, math.ceil(MIN_CHUNK / tile_h))
        reader = _LevelReader(self.backend, level, on_error)
        token = tokenize(self.path, _file_stamp(self.path), id(self.backend), level, on_error)
        return da.from_array(
            reader,
            chunks=(min(chunk_h, height), min(chunk_w, width), 3),
            name=f"slide-{Path(self.name).stem}-L{level}-{token}",
            asarray=False,
            fancy=False,
            lock=False,
            inline_array=True,
            meta=np.empty((0, 0, 3), np.uint8),
        )

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the file."""
        self.backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        mpp = f"{self.mpp[0]:.3g} um/px" if self.mpp else "no um/px"
        return f"<Slide {self.name} {w}x{h} {self.level_count} levels {mpp} via {self.backend.name}>"


class _LevelReader:
    """Array-like view of one level: dask slices it chunk by chunk."""

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(
        self,
        backend: SlideBackend,
        level: int,
        on_error: Callable[[SlideReadError], None] | None,
    ) -> None:
        self.backend = backend
        self.level = level
        self.on_error = on_error
        width, height = backend.level_dimensions[level]
        self.shape = (height, width, 3)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        try:
            region = self.backend.read_region(self.level, x0, y0, x1 - x0, y1 - y0)
        except SlideReadError as exc:
            if self.on_error is None:
                raise
            self.on_error(exc)
            region = np.full((y1 - y0, x1 - x0, 3), UNREADABLE_FILL, np.uint8)
        return region[:, :, key[2]] if len(key) > 2 else region


def _file_stamp(path: str | None) -> tuple[float, int] | None:
    if not path:
        return None
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_mtime, stat.st_size


# --------------------------------------------------------------------------- opening


def open_slide(path: str | Path, *, mpp: float | None = None) -> Slide:
    """Open a whole-slide image or plain image with the first backend that reads it.

    Reads only headers: no pixel is decoded.

    Parameters
    ----------
    path : str or Path
        SVS, NDPI, MRXS, SCN, VMS/VMU, BIF, generic tiled TIFF, DICOM WSI,
        OME-TIFF and other TIFF, PNG or JPEG.
    mpp : float, optional
        um/px to use instead of (or in the absence of) the file's own.

    Returns
    -------
    Slide

    Raises
    ------
    UnsupportedFormatError
        When no backend reads this kind of file.
    SlideOpenError
        When the file is of a supported kind but broken, with the cause.

    """
    path = Path(path)
    if not path.exists():
        raise SlideOpenError(f"Cannot open {path.name}: no such file ({path})")
    if path.is_dir():
        raise UnsupportedFormatError(f"Cannot open {path.name}: it is a folder, not a slide file")
    if not is_supported_path(path):
        raise UnsupportedFormatError(
            f"Cannot open {path.name}: unsupported file type {path.suffix!r} "
            f"(supported: {', '.join(SUPPORTED_SUFFIXES)})"
        )
    return Slide(_open_backend(path), mpp=mpp)


def _open_backend(path: Path) -> SlideBackend:
    lower = path.name.lower()
    if lower.endswith(IMAGE_SUFFIXES):
        return ImageBackend(path)
    is_tiff = lower.endswith(TIFF_SUFFIXES)
    if is_tiff and _tiff_needs_tifffile(path):
        return TiffBackend(path)
    import openslide

    try:
        detected = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # unreadable file: fall through to the clear message below
        detected = None
    if detected is not None:
        try:
            return OpenSlideBackend(path)
        except SlideOpenError as openslide_error:
            if not is_tiff:
                raise
            try:
                return TiffBackend(path)
            except SlideOpenError:
                raise openslide_error from None
    if is_tiff:
        return TiffBackend(path)
    raise SlideOpenError(
        f"Cannot open {path.name}: OpenSlide does not recognise its contents "
        f"(a {path.suffix} file that is corrupt, truncated or not really {path.suffix})"
    )


def _tiff_needs_tifffile(path: Path) -> bool:
    """OME-TIFF and SubIFD pyramids read better with tifffile than OpenSlide."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ome:
                return True
            first = tif.pages.first
            return bool(first.subifds) and len(tif.series[0].levels) > 1
    except Exception:
        return False  # let OpenSlide (or the error path) explain the problem
