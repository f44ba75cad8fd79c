"""Open a slide file with the right backend and expose it as a lazy pyramid.

What is refused, and why (issue 11):

- anything but a regular file (a FIFO, socket or device would block or stream
  forever), and empty files;
- a TIFF whose full-resolution level is truncated; a truncated or undecodable
  lower level is dropped and named in :attr:`Slide.warnings` (and ``info``);
- a slide whose coarsest level exceeds :data:`MAX_UNPYRAMIDED_PIXELS`: the
  viewer's small levels are computed from it (:data:`TOP_LEVEL_SIDE`), which
  reads all of it, in bounded memory; larger ones need a real pyramid;
- region reads above :data:`~napari_pathology.slide.backends.MAX_REGION_PIXELS`
  and images that must be decoded whole above
  :data:`~napari_pathology.slide.backends.MAX_DECODE_PIXELS`;
- a user um/px outside the range scanners give.

:attr:`Slide.brightfield` tells fluorescence (dark-field) slides from
brightfield ones; :meth:`Slide.require_brightfield` refuses them for the H&E
models and tissue masks.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from napari_pathology.fileio import require_regular_file
from napari_pathology.slide.backends import (
    PLAUSIBLE_MPP,
    ImageBackend,
    OpenSlideBackend,
    SlideBackend,
    SlideOpenError,
    SlideReadError,
    TiffBackend,
    UnsupportedFormatError,
    megapixels,
    quiet_tifffile,
    tiff_damage,
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

#: The viewer's pyramid ends with a level no larger than this on its longer side;
#: levels the file lacks are computed on the fly from its coarsest level.
TOP_LEVEL_SIDE = 2048

#: Chunk side of computed levels.
COMPUTED_CHUNK = 512

#: Largest coarsest level a slide may have (pixels): computing the pyramid's
#: small levels from it reads all of it. Larger slides without a pyramid are refused.
MAX_UNPYRAMIDED_PIXELS = 2**30


class NotBrightfieldError(SlideOpenError):
    """A fluorescence (dark-field) slide was given to a step made for brightfield H&E."""


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
    brightfield: bool | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

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
        data["warnings"] = list(self.warnings)
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
        self._brightfield: tuple[bool | None, str] | None = None
        #: The settings file whose remembered um/px :func:`open_slide` applied, if any.
        self.mpp_restored_from: Path | None = None
        #: Problems met while opening that are not the file's (an unusable settings file).
        self.notes: list[str] = []
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
            For a value that is not a positive finite number within
            :data:`~napari_pathology.slide.backends.PLAUSIBLE_MPP`.

        """
        if mpp is not None and (not math.isfinite(mpp) or mpp <= 0):
            raise ValueError(f"um/px must be a positive number, got {mpp!r}")
        low, high = PLAUSIBLE_MPP
        if mpp is not None and not low <= mpp <= high:
            raise ValueError(
                f"um/px of {self.name} must be between {low:g} and {high:g} (what slide scanners and "
                f"microscopes give), got {mpp!r}"
            )
        self._mpp_override = None if mpp is None else float(mpp)

    def require_mpp(self) -> tuple[float, float]:
        """The um/px, or a clear error telling the user how to supply it."""
        if self.mpp is None:
            raise SlideOpenError(
                f"{self.name} has no um/px ({self.backend.mpp_note}); set it in the Slide panel or pass --mpp"
            )
        return self.mpp

    @property
    def warnings(self) -> tuple[str, ...]:
        """Problems found in the file that did not stop it from opening (missing levels...)."""
        return (*getattr(self.backend, "warnings", ()), *self.notes)

    @property
    def brightfield(self) -> bool | None:
        """True for a brightfield (H&E-like) slide, False for a fluorescence / dark-field one.

        Judged once from a small low-resolution read (see :func:`judge_brightfield`)
        and from OME metadata; None when the slide is blank or unreadable.
        """
        if self._brightfield is None:
            self._brightfield = _slide_brightfield(self)
        return self._brightfield[0]

    def require_brightfield(self) -> None:
        """Refuse a fluorescence (dark-field) slide for the H&E models and tissue masks.

        Raises
        ------
        NotBrightfieldError
            When :attr:`brightfield` is False; the message names the slide and why.

        """
        if self.brightfield is False:
            reason = self._brightfield[1] if self._brightfield else ""
            raise NotBrightfieldError(
                f"{self.name} looks like a fluorescence (dark-field) slide ({reason}): the H&E models and "
                "tissue masks do not apply"
            )

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
            brightfield=self.brightfield,
            warnings=self.warnings,
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
        """Decode the first and last tile of every level to prove the pixel data is readable.

        A lower level that cannot be decoded is dropped (the viewer computes
        its resolution from the levels that remain) and named in
        :attr:`warnings`.

        Raises
        ------
        SlideReadError
            When tiles of the full-resolution level cannot be decoded.

        """
        bad: dict[int, SlideReadError] = {}
        for level in range(self.level_count):
            width, height = self.level_dimensions[level]
            tile_w, tile_h = self.backend.tile_sizes[level]
            tile_w, tile_h = max(1, min(width, tile_w)), max(1, min(height, tile_h))
            last_x, last_y = (width - 1) // tile_w * tile_w, (height - 1) // tile_h * tile_h
            try:
                self.read_region(level, 0, 0, tile_w, tile_h)
                last_w, last_h = min(tile_w, width - last_x), min(tile_h, height - last_y)
                self.read_region(level, last_x, last_y, last_w, last_h)
            except SlideReadError as exc:
                if level == 0:
                    raise
                bad[level] = exc
        if bad:
            drop = getattr(self.backend, "drop_levels", None)
            try:
                if drop is None:
                    raise NotImplementedError
                drop(set(bad), "cannot be decoded")
            except NotImplementedError:
                raise next(iter(bad.values())) from None
            self._pyramid = None

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
        levels += self._computed_levels(on_error)
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

    def _computed_levels(self, on_error: Callable[[SlideReadError], None] | None) -> list[da.Array]:
        """Levels the file lacks, down to :data:`TOP_LEVEL_SIDE`, computed from the coarsest level."""
        source = self.level_count - 1
        width, height = self.level_dimensions[source]
        levels: list[da.Array] = []
        factor = 1
        while max(math.ceil(width / factor), math.ceil(height / factor)) > TOP_LEVEL_SIDE:
            factor *= 2
            reader = _ComputedLevelReader(self.backend, source, factor, on_error)
            h, w = reader.shape[:2]
            token = tokenize(self.path, _file_stamp(self.path), id(self.backend), source, factor, on_error)
            levels.append(
                da.from_array(
                    reader,
                    chunks=(min(COMPUTED_CHUNK, h), min(COMPUTED_CHUNK, w), 3),
                    name=f"slide-{Path(self.name).stem}-L{source}x{factor}-{token}",
                    asarray=False,
                    fancy=False,
                    lock=False,
                    inline_array=True,
                    meta=np.empty((0, 0, 3), np.uint8),
                )
            )
        return levels

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


class _ComputedLevelReader:
    """A level the file lacks: each read area-averages ``factor`` x ``factor`` pixels of a file level.

    Only the part of the source level under the request is read, in blocks of
    at most about :data:`_SOURCE_BLOCK` pixels per side, so memory stays bounded
    whatever the slide's size.
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(
        self,
        backend: SlideBackend,
        level: int,
        factor: int,
        on_error: Callable[[SlideReadError], None] | None,
    ) -> None:
        self.backend = backend
        self.level = level
        self.factor = int(factor)
        self.on_error = on_error
        width, height = backend.level_dimensions[level]
        self.source_shape = (height, width)
        self.shape = (math.ceil(height / factor), math.ceil(width / factor), 3)
        self._cache: OrderedDict[tuple[int, int, int, int], np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        oy0, oy1, _ = key[0].indices(self.shape[0])
        ox0, ox1, _ = key[1].indices(self.shape[1])
        region = (oy0, oy1, ox0, ox1)
        with self._cache_lock:
            out = self._cache.get(region)
            if out is not None:
                self._cache.move_to_end(region)
        if out is None:
            out = self._compute(oy0, oy1, ox0, ox1)
            out.setflags(write=False)
            with self._cache_lock:  # napari asks for the small levels again and again (thumbnail, redraws)
                self._cache[region] = out
                while sum(a.nbytes for a in self._cache.values()) > _CACHE_BYTES and len(self._cache) > 1:
                    self._cache.popitem(last=False)
        return out[:, :, key[2]] if len(key) > 2 else out

    def _compute(self, oy0: int, oy1: int, ox0: int, ox1: int) -> np.ndarray:
        f = self.factor
        out = np.full((max(0, oy1 - oy0), max(0, ox1 - ox0), 3), 255, np.uint8)
        step = max(1, _SOURCE_BLOCK // f)  # output pixels per block side
        src_h, src_w = self.source_shape
        for by in range(oy0, oy1, step):
            by1 = min(oy1, by + step)
            for bx in range(ox0, ox1, step):
                bx1 = min(ox1, bx + step)
                sy0, sy1 = by * f, min(src_h, by1 * f)
                sx0, sx1 = bx * f, min(src_w, bx1 * f)
                try:
                    block = self.backend.read_region(self.level, sx0, sy0, sx1 - sx0, sy1 - sy0)
                except SlideReadError as exc:
                    if self.on_error is None:
                        raise
                    self.on_error(exc)
                    block = np.full((sy1 - sy0, sx1 - sx0, 3), UNREADABLE_FILL, np.uint8)
                out[by - oy0 : by1 - oy0, bx - ox0 : bx1 - ox0] = downsample_mean(block, f)
        return out


#: Side of the source blocks a computed level reads at once (pixels).
_SOURCE_BLOCK = 2048

#: Bytes of computed chunks each computed level keeps (the top level is kept whole).
_CACHE_BYTES = 3 * TOP_LEVEL_SIDE**2 + 2**20


def downsample_mean(block: np.ndarray, factor: int) -> np.ndarray:
    """Area-average ``factor`` x ``factor`` pixels of an ``(H, W, C)`` uint8 image (partial edge windows)."""
    h, w = block.shape[:2]
    rows, cols = np.arange(0, h, factor), np.arange(0, w, factor)
    wide = np.uint32 if factor * factor * 255 < 2**32 else np.uint64
    acc = np.add.reduceat(np.add.reduceat(block.astype(wide), rows, axis=0), cols, axis=1)
    count = np.diff(np.append(rows, h))[:, None] * np.diff(np.append(cols, w))[None, :]
    count = count.astype(wide)[..., None]
    return ((acc + count // 2) // count).astype(np.uint8)


def judge_brightfield(rgb: np.ndarray, border: np.ndarray | None = None) -> tuple[bool | None, str]:
    """Whether a low-resolution view of a slide looks brightfield (light glass) or dark-field.

    A fluorescence slide is mostly black with a few bright spots (nuclei);
    an H&E slide is light glass around pink and purple tissue.

    Parameters
    ----------
    rgb : ndarray
        ``(..., 3)`` uint8 pixels of the slide (a thumbnail or samples of one).
        Pure white pixels (outside the scanned area) are ignored.
    border : ndarray, optional
        Pixels of the slide's border (background); by default not used.

    Returns
    -------
    tuple
        ``(True | False | None, reason)``; None when the view is blank.

    """
    px = np.asarray(rgb, np.uint8).reshape(-1, 3)
    seen = px[px.min(axis=1) < 255]
    if len(seen) < max(16, 0.01 * len(px)):
        return None, "the slide is blank"
    brightest = seen.max(axis=1)
    dark = float((brightest < 50).mean())
    glass = float((seen.min(axis=1) > 200).mean())
    signal = float(np.percentile(brightest, 99.5)) - float(np.median(brightest))
    if border is not None and len(border):
        b = np.asarray(border, np.uint8).reshape(-1, 3)
        b = b[b.min(axis=1) < 255]
        if len(b) and float(np.median(b.max(axis=1))) >= 50:
            return True, "light background"
    if dark >= 0.5 and glass < 0.1:
        if signal < 30:
            return None, f"{dark:.0%} of a low-resolution view is black, with no signal"
        return False, f"{dark:.0%} of a low-resolution view is black background"
    return True, "light background"


def _slide_brightfield(slide: Slide) -> tuple[bool | None, str]:
    """:func:`judge_brightfield` on a small sample of the coarsest level (and OME metadata)."""
    description = str(slide.backend.properties.get("tiff.ImageDescription", ""))
    if "Epifluorescence" in description or 'IlluminationType="Fluorescence"' in description:
        return False, "its OME metadata says epifluorescence"
    level = slide.level_count - 1
    width, height = slide.level_dimensions[level]
    try:
        if width * height <= 2**21:
            image = slide.read_region(level, 0, 0, width, height)
            edge = max(1, min(width, height) // 20)
            border = np.concatenate(
                [image[:edge].reshape(-1, 3), image[-edge:].reshape(-1, 3),
                 image[:, :edge].reshape(-1, 3), image[:, -edge:].reshape(-1, 3)]
            )  # fmt: skip
            return judge_brightfield(image, border)
        side = 64
        xs = np.linspace(0, max(0, width - side), 8).astype(int)
        ys = np.linspace(0, max(0, height - side), 8).astype(int)
        w, h = min(side, width), min(side, height)
        patches = [slide.read_region(level, int(x), int(y), w, h) for y in ys for x in xs]
        return judge_brightfield(np.concatenate([p.reshape(-1, 3) for p in patches]))
    except (SlideReadError, ValueError):
        return None, "its pixels could not be read"


def _file_stamp(path: str | None) -> tuple[float, int] | None:
    if not path:
        return None
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_mtime, stat.st_size


# --------------------------------------------------------------------------- opening


def open_slide(path: str | Path, *, mpp: float | None = None, remembered: bool = True) -> Slide:
    """Open a whole-slide image or plain image with the first backend that reads it.

    Reads only headers: no pixel is decoded.

    Parameters
    ----------
    path : str or Path
        SVS, NDPI, MRXS, SCN, VMS/VMU, BIF, generic tiled TIFF, DICOM WSI,
        OME-TIFF and other TIFF, PNG or JPEG.
    mpp : float, optional
        um/px to use instead of (or in the absence of) the file's own.
    remembered : bool
        Without ``mpp``, use the um/px the user set for this slide earlier (kept
        by :mod:`napari_pathology.slide.settings`); :attr:`Slide.mpp_restored_from`
        then names the settings file, and a settings file that cannot be used is
        named in :attr:`Slide.warnings`.

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
    try:  # a FIFO, socket or device would block (or stream) forever in any backend
        require_regular_file(path, "slide file")
    except (OSError, ValueError) as exc:
        raise UnsupportedFormatError(f"Cannot open {path.name}: {exc}") from None
    if path.stat().st_size == 0:
        raise SlideOpenError(f"Cannot open {path.name}: the file is empty (0 bytes)")
    backend = _open_backend(path)
    try:
        _check_file_levels(backend, path)
        _check_pyramid(backend)
    except BaseException:
        backend.close()
        raise
    slide = Slide(backend, mpp=mpp)
    if mpp is None and remembered:
        _restore_mpp(slide, path)
    return slide


def _restore_mpp(slide: Slide, path: Path) -> None:
    """Apply the um/px the user set for this slide earlier, if any (see :mod:`.settings`)."""
    from napari_pathology.slide.settings import remembered_mpp

    value, where, problem = remembered_mpp(path)
    if value is not None:
        try:
            slide.set_mpp(value)
            slide.mpp_restored_from = where
        except ValueError as exc:
            problem = f"the um/px kept in {where} was not used: {exc}"
    if problem:
        slide.notes.append(problem)


def _check_pyramid(backend: SlideBackend) -> None:
    """Refuse a slide whose coarsest level is too large to compute a small pyramid from."""
    width, height = backend.level_dimensions[-1]
    if max(width, height) > TOP_LEVEL_SIDE and width * height > MAX_UNPYRAMIDED_PIXELS:
        w0, h0 = backend.level_dimensions[0]
        single = len(backend.level_dimensions) == 1
        levels = "a single level" if single else f"no level under {width}x{height} px"
        name = Path(backend.path).name if backend.path else "the slide"
        raise SlideOpenError(
            f"Cannot open {name}: it is {w0}x{h0} px with {levels} ({megapixels(width * height)}); "
            f"without a pyramid it can be shown only up to {megapixels(MAX_UNPYRAMIDED_PIXELS)}. "
            "Convert it to a tiled pyramidal TIFF (e.g. vips tiffsave IN OUT.tif --tile --pyramid)"
        )


def _check_file_levels(backend: SlideBackend, path: Path) -> None:
    """For TIFF-based files read by OpenSlide: find levels whose tiles lie past the end of the file."""
    if not isinstance(backend, OpenSlideBackend):
        return
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError:
        return
    if magic not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return
    import tifffile

    with quiet_tifffile() as logged:
        try:
            with tifffile.TiffFile(path) as tif:
                damaged = tiff_damage(tif, path.stat().st_size)
        except Exception:  # OpenSlide read it; tifffile's opinion is only advice here
            return
    bad = {level for level, dims in enumerate(backend.level_dimensions) if dims in damaged}
    if 0 in bad:
        missing, total = damaged[backend.level_dimensions[0]]
        w, h = backend.level_dimensions[0]
        raise SlideOpenError(
            f"Cannot open {path.name}: the file is truncated ({missing} of {total} tiles of the {w}x{h} px "
            f"full-resolution level lie past its end at {path.stat().st_size:,} bytes); "
            "copy or download it again"
        )
    backend.drop_levels(bad, "lie past the end of the truncated file")
    if any("invalid page offset" in m for m in logged):
        backend.warnings.append(
            f"{path.name} is truncated or damaged: images stored after its last readable page are missing"
        )


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
        with quiet_tifffile(), tifffile.TiffFile(path) as tif:
            if tif.is_ome:
                return True
            first = tif.pages.first
            return bool(first.subifds) and len(tif.series[0].levels) > 1
    except Exception:
        return False  # let OpenSlide (or the error path) explain the problem
