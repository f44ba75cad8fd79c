"""Where slide pixels come from: one protocol, several libraries behind it.

Every backend exposes the same small surface (:class:`SlideBackend`): level
geometry, the file's tile grid, um/px, objective power, associated images, and
``read_region(level, x, y, width, height)`` in *level* pixel coordinates that
returns RGB ``uint8`` with out-of-slide and transparent pixels painted white.
Tiling, pyramids and models never need to know which library decoded the
pixels.

Implementations
---------------
- :class:`OpenSlideBackend`: SVS, NDPI, MRXS, SCN, VMS/VMU, BIF, generic tiled
  TIFF, DICOM WSI (everything OpenSlide reads).
- :class:`TiffBackend`: OME-TIFF and other (pyramidal) TIFF via tifffile.
- :class:`ImageBackend`: plain PNG/JPEG/TIFF tiles, one level, decoded on
  first use.
- :class:`InMemoryBackend`: numpy (or any array-like) levels; used by tests
  and synthetic data.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

#: um/px outside this range is treated as missing: such values come from
#: default screen resolutions (72 or 96 dpi) written by generic software.
PLAUSIBLE_MPP = (0.01, 50.0)

WHITE = 255

#: The most pixels one :meth:`BaseBackend.read_region` call returns (768 MiB of RGB).
MAX_REGION_PIXELS = 2**28

#: The most pixels decoded at once from a file that cannot be read in parts
#: (a PNG/JPEG slide, a mask image, an associated image, one TIFF strip).
MAX_DECODE_PIXELS = 2**28

_PIL_LOCK = threading.Lock()


class SlideOpenError(RuntimeError):
    """A slide file could not be opened or decoded.

    The message names the file and the cause, ready to show to a user.
    """


class UnsupportedFormatError(SlideOpenError):
    """No backend can read this kind of file."""


class SlideReadError(SlideOpenError):
    """Pixels of an opened slide could not be read (corrupt or truncated tiles)."""


class RegionTooLargeError(ValueError):
    """A read asked for more pixels than :data:`MAX_REGION_PIXELS` at once."""


def megapixels(pixels: float) -> str:
    """``"40,000 Mpx"``-style text for messages."""
    return f"{pixels / 1e6:,.0f} Mpx" if pixels >= 1e7 else f"{pixels / 1e6:,.1f} Mpx"


def open_image_checked(
    path: str | os.PathLike[str],
    what: str,
    max_bytes: int = 3 * MAX_DECODE_PIXELS,
    bytes_per_pixel: int | None = None,
) -> Any:
    """Open an image with PIL after checking its decoded size; the caller closes it.

    PIL's own decompression-bomb check raises with a traceback-like message at a
    fixed size; here the size is checked against ``max_bytes`` of decoded
    pixels (a 1-bit or gray mask may be larger in pixels than an RGB image)
    and refused with one line that names the file. ``bytes_per_pixel`` counts
    what the caller converts the image to (by default, the image's bands).

    Raises
    ------
    ValueError
        When the image would decode to more than ``max_bytes``, PIL cannot
        read its header, or it is not a regular file.
    FileNotFoundError
        When nothing is there.

    """
    from PIL import Image, UnidentifiedImageError

    from napari_pathology.fileio import require_regular_file

    path = require_regular_file(path, what)  # a FIFO would block PIL forever
    with _PIL_LOCK:  # only the header is parsed while PIL's global limit is lifted
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(path)
        except FileNotFoundError:
            raise
        except UnidentifiedImageError:
            raise ValueError(f"Cannot open {what} {path.name}: not an image file PIL reads") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise ValueError(f"Cannot open {what} {path.name}: {exc}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    width, height = image.size
    bands = max(1, len(image.getbands()))
    decoded = width * height * (bytes_per_pixel or bands)
    if width <= 0 or height <= 0 or decoded > max_bytes:
        image.close()
        raise ValueError(
            f"{what} {path.name} is {width} x {height} px ({megapixels(width * height)}): more than the "
            f"{megapixels(max_bytes // (bytes_per_pixel or bands))} of this kind read at once; "
            "save it smaller (or as a tiled pyramidal TIFF)"
        )
    return image


@runtime_checkable
class SlideBackend(Protocol):
    """What every slide reader provides.

    Coordinates are ``(x, y)`` with x to the right and y down; sizes are
    ``(width, height)``; arrays are ``(height, width, 3)`` RGB ``uint8``.
    """

    name: str
    path: str | None
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    tile_sizes: tuple[tuple[int, int], ...]
    mpp: tuple[float, float] | None
    mpp_note: str
    objective_power: float | None
    associated_image_names: tuple[str, ...]
    properties: Mapping[str, str]
    read_count: int

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Read a region of one level, in that level's pixel coordinates."""
        ...

    def read_associated_image(self, name: str) -> np.ndarray:
        """Read an associated image (label, macro, thumbnail) as RGB uint8."""
        ...

    def close(self) -> None:
        """Release file handles."""
        ...


def checked_mpp(value: float | None, source: str) -> tuple[float | None, str]:
    """Return ``(mpp, note)``, dropping values no slide scanner would write.

    Parameters
    ----------
    value : float or None
        Micrometres per pixel as read from a file.
    source : str
        Where the value came from, for the note.

    Returns
    -------
    tuple
        The value (or None) and a human-readable note on where it came from
        or why it was rejected.

    """
    if value is None or not math.isfinite(value) or value <= 0:
        return None, "the file records no um/px"
    low, high = PLAUSIBLE_MPP
    if not low <= value <= high:
        return None, (
            f"the file's {source} gives {value:.4g} um/px, which no slide scanner writes "
            "(probably a default screen resolution)"
        )
    return float(value), source


def rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite an RGBA ``uint8`` image over white and return RGB.

    Fully opaque input takes a fast path; fully transparent (out-of-slide)
    pixels become pure white.
    """
    alpha = rgba[..., 3]
    rgb = rgba[..., :3]
    if alpha.min() == WHITE:
        return rgb  # a view: the pyramid copies chunks into place anyway
    a = alpha[..., None].astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + WHITE * (WHITE - a) + 127) // WHITE
    return out.astype(np.uint8)


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """Convert a gray, RGB or RGBA array of any integer/float dtype to RGB uint8."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):
            array = np.clip(array * (255.0 if array.max(initial=0) <= 1.0 else 1.0), 0, 255)
        elif array.dtype == np.uint16:
            array = array // 257
        elif array.dtype == bool:
            array = array * 255
        array = array.astype(np.uint8)
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    if array.shape[-1] == 4:
        return rgba_to_rgb_on_white(array)
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


class BaseBackend:
    """Shared bookkeeping: bounds clipping, white padding and a read counter."""

    name = "base"

    def __init__(self) -> None:
        self.read_count = 0
        self._count_lock = threading.Lock()
        self.warnings: list[str] = []

    # Subclasses fill these in.
    path: str | None = None
    vendor: str = "unknown"
    level_dimensions: tuple[tuple[int, int], ...] = ()
    level_downsamples: tuple[float, ...] = ()
    tile_sizes: tuple[tuple[int, int], ...] = ()
    mpp: tuple[float, float] | None = None
    mpp_note: str = ""
    objective_power: float | None = None
    associated_image_names: tuple[str, ...] = ()
    properties: Mapping[str, str] = {}

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        raise NotImplementedError

    def drop_levels(self, bad: set[int], why: str) -> None:
        """Stop serving the levels in ``bad`` (damaged in the file); level 0 must stay.

        The remaining levels keep their order; a warning naming the dropped
        levels is added to :attr:`warnings`.
        """
        bad = {level for level in bad if 0 < level < len(self.level_dimensions)}
        if not bad:
            return
        keep = [level for level in range(len(self.level_dimensions)) if level not in bad]
        dims = ", ".join(f"{self.level_dimensions[i][0]}x{self.level_dimensions[i][1]}" for i in sorted(bad))
        self.level_dimensions = tuple(self.level_dimensions[i] for i in keep)
        self.level_downsamples = tuple(self.level_downsamples[i] for i in keep)
        self.tile_sizes = tuple(self.tile_sizes[i] for i in keep)
        self._keep_levels(keep)
        self.warnings.append(
            f"{self.display_name}: pyramid level(s) {', '.join(map(str, sorted(bad)))} ({dims}) {why}; "
            "they are not used (lower resolutions are computed from the levels that remain)"
        )

    def _keep_levels(self, keep: list[int]) -> None:
        """Subclasses map served levels to the file's levels here."""
        raise NotImplementedError(f"{type(self).__name__} cannot drop levels")

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Read ``(height, width, 3)`` RGB uint8 pixels of ``level`` at ``(x, y)``.

        Parts of the request outside the level are white.

        Raises
        ------
        SlideReadError
            When the file's pixel data cannot be decoded.

        """
        if not 0 <= level < len(self.level_dimensions):
            raise IndexError(f"level {level} out of range (slide has {len(self.level_dimensions)})")
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive, got {width}x{height}")
        if width * height > MAX_REGION_PIXELS:
            raise RegionTooLargeError(
                f"Reading a {width}x{height} px region of {self.display_name} at once "
                f"({megapixels(width * height)}) is refused: the limit is {megapixels(MAX_REGION_PIXELS)}; "
                "read it in tiles or from a coarser level"
            )
        level_w, level_h = self.level_dimensions[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, level_w), min(y + height, level_h)
        with self._count_lock:
            self.read_count += 1
        if x0 >= x1 or y0 >= y1:
            return np.full((height, width, 3), WHITE, np.uint8)
        try:
            inside = self._read(level, x0, y0, x1 - x0, y1 - y0)
        except SlideOpenError:
            raise
        except Exception as exc:  # library errors differ per backend; name the file and cause
            raise SlideReadError(
                f"Cannot read pixels of {self.display_name} (level {level}, x={x0}, y={y0}, "
                f"{x1 - x0}x{y1 - y0}): {exc}"
            ) from exc
        if (x0, y0, x1, y1) == (x, y, x + width, y + height):
            return inside
        out = np.full((height, width, 3), WHITE, np.uint8)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = inside
        return out

    def read_associated_image(self, name: str) -> np.ndarray:
        """Read an associated image by name; ``KeyError`` when absent."""
        raise KeyError(f"{self.display_name} has no associated image {name!r}")

    @property
    def display_name(self) -> str:
        """The file name (or a description for in-memory slides)."""
        return Path(self.path).name if self.path else f"<{self.name} slide>"

    def close(self) -> None:
        """Release file handles (nothing to do by default)."""

    def __repr__(self) -> str:
        w, h = self.level_dimensions[0] if self.level_dimensions else (0, 0)
        return f"<{type(self).__name__} {self.display_name} {w}x{h} levels={len(self.level_dimensions)}>"


# --------------------------------------------------------------------------- OpenSlide


class OpenSlideBackend(BaseBackend):
    """Read any format OpenSlide supports (thread-safe; OpenSlide caches tiles)."""

    name = "openslide"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        import openslide

        self.path = str(path)
        try:
            self._slide = openslide.OpenSlide(self.path)
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise UnsupportedFormatError(
                f"Cannot open {Path(path).name}: not a format OpenSlide reads ({exc})"
            ) from exc
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideOpenError(f"Cannot open {Path(path).name}: {exc}") from exc
        props = dict(self._slide.properties)
        self.properties = props
        self.vendor = props.get("openslide.vendor", "unknown")
        self.level_dimensions = tuple(tuple(map(int, d)) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.tile_sizes = tuple(
            (
                int(props.get(f"openslide.level[{i}].tile-width", 256)),
                int(props.get(f"openslide.level[{i}].tile-height", 256)),
            )
            for i in range(len(self.level_dimensions))
        )
        mpp_x, note = checked_mpp(_float_or_none(props.get("openslide.mpp-x")), "um/px metadata")
        mpp_y, _ = checked_mpp(_float_or_none(props.get("openslide.mpp-y")), "um/px metadata")
        self.mpp = (mpp_x, mpp_y or mpp_x) if mpp_x else None
        self.mpp_note = note
        self.objective_power = _float_or_none(props.get("openslide.objective-power"))
        self.associated_image_names = tuple(self._slide.associated_images.keys())
        self._source_levels = list(range(len(self.level_dimensions)))

    def _keep_levels(self, keep: list[int]) -> None:
        self._source_levels = [self._source_levels[i] for i in keep]

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        location = (round(x * ds), round(y * ds))
        handle = self._slide
        try:
            region = handle.read_region(location, self._source_levels[level], (width, height))
        except Exception:
            self._reopen(handle)  # OpenSlide errors are sticky: one bad tile would break every later read
            raise
        return rgba_to_rgb_on_white(np.asarray(region))

    def _reopen(self, failed: Any) -> None:
        """Replace a handle that reported an error by a fresh one (once, whatever the threads)."""
        import openslide

        with self._count_lock:
            if self._slide is not failed:
                return
            try:
                self._slide = openslide.OpenSlide(self.path)
            except Exception:  # the file went away: keep the failed handle, reads keep failing clearly
                return
        # the failed handle is not closed: another thread may still be inside it

    def read_associated_image(self, name: str) -> np.ndarray:
        """Read ``label``, ``macro``, ``thumbnail``... as RGB uint8."""
        if name not in self.associated_image_names:
            return super().read_associated_image(name)
        return to_rgb_uint8(np.asarray(self._slide.associated_images[name]))  # OpenSlide keeps these small

    def close(self) -> None:
        """Close the OpenSlide handle."""
        self._slide.close()


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- tifffile


@contextlib.contextmanager
def quiet_tifffile() -> Iterator[list[str]]:
    """Collect what tifffile logs (``invalid page offset``...) instead of printing it.

    Yields the list the messages are appended to, so the caller can turn the
    ones that matter into warnings of its own.
    """
    logger = logging.getLogger("tifffile")
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            with contextlib.suppress(Exception):
                messages.append(record.getMessage())

    handler = _Collect(logging.WARNING)
    saved = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = saved


def _chain_cut(messages: Sequence[str]) -> bool:
    """Whether tifffile's log says the chain of pages ended at a bad offset (a cut file)."""
    return any("invalid page offset" in m or "corrupted" in m.lower() for m in messages)


def tiff_damage(tif: Any, file_size: int) -> dict[tuple[int, int], tuple[int, int]]:
    """Pages of an open TIFF whose pixel data lies past the end of the file.

    Parameters
    ----------
    tif : tifffile.TiffFile
        The open file (its pages are read, not their pixels).
    file_size : int
        Size of the file in bytes.

    Returns
    -------
    dict
        ``{(width, height): (missing, total)}`` segments (tiles or strips) of each
        damaged page.

    """
    damaged: dict[tuple[int, int], tuple[int, int]] = {}
    for page in tif.pages:
        with contextlib.suppress(Exception):
            offsets = np.asarray(page.dataoffsets, np.int64)
            counts = np.asarray(page.databytecounts, np.int64)
            bad = int(((counts > 0) & (offsets + counts > file_size)).sum())
            if bad:
                damaged[(int(page.imagewidth), int(page.imagelength))] = (bad, int(counts.size))
    return damaged


class TiffBackend(BaseBackend):
    """OME-TIFF and other pyramidal or plain TIFF through tifffile.

    Tiles and strips are read and decoded synchronously, one segment at a
    time, so a region read holds only the segments it touches; a truncated
    file is reported at open (level 0) or its damaged levels are dropped with
    a warning (:attr:`warnings`).
    """

    name = "tifffile"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        import tifffile

        self.path = str(path)
        name = Path(path).name
        with quiet_tifffile() as logged:
            try:
                self._tif = tifffile.TiffFile(self.path)
                series = self._tif.series[0]
                levels = list(series.levels)
                damaged = tiff_damage(self._tif, os.path.getsize(self.path))
            except Exception as exc:
                if getattr(self, "_tif", None) is not None:
                    self._tif.close()
                damaged_file = isinstance(exc, tifffile.TiffFileError)
                hint = " (the file is damaged or truncated)" if damaged_file else ""
                raise SlideOpenError(f"Cannot open {name}: {exc}{hint}") from exc
        try:
            self._setup(series, levels, name)
        except BaseException:
            self._tif.close()
            raise
        bad = {i for i, dims in enumerate(self.level_dimensions) if dims in damaged}
        if 0 in bad:
            missing, total = damaged[self.level_dimensions[0]]
            w, h = self.level_dimensions[0]
            self._tif.close()
            raise SlideOpenError(
                f"Cannot open {name}: the file is truncated ({missing} of {total} tiles of the {w}x{h} px "
                f"full-resolution level lie past its end at {os.path.getsize(self.path):,} bytes); "
                "copy or download it again"
            )
        self.drop_levels(bad, "lie past the end of the truncated file")
        if _chain_cut(logged):
            self.warnings.append(
                f"{name} is truncated or damaged after its page {len(self._tif.pages)}: "
                f"pyramid levels and associated images stored after it are missing ({logged[0]})"
            )

    def _setup(self, series: Any, levels: list[Any], name: str) -> None:
        import tifffile

        axes = series.axes.upper()
        if not (axes.endswith("YXS") or axes.endswith("YX")):
            raise UnsupportedFormatError(
                f"Cannot open {name}: TIFF axes {series.axes!r} are not a 2-D (RGB) image"
            )
        page = levels[0].keyframe
        try:
            tifffile.TIFF.DECOMPRESSORS[page.compression]
        except (KeyError, ValueError) as exc:
            raise SlideOpenError(
                f"Cannot open {name}: unsupported TIFF compression {page.compression}"
            ) from exc
        self._series_axes = axes
        self._levels = levels
        self._source_levels = list(range(len(levels)))
        self._arrays: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._segment_cache: tuple[tuple[int, int], np.ndarray] | None = None
        shapes = [lv.shape for lv in levels]
        y_axis, x_axis = axes.index("Y"), axes.index("X")
        self.level_dimensions = tuple((int(s[x_axis]), int(s[y_axis])) for s in shapes)
        w0 = self.level_dimensions[0][0]
        self.level_downsamples = tuple(w0 / w for w, _ in self.level_dimensions)
        self.tile_sizes = tuple(_tiff_tile_size(lv.keyframe) for lv in levels)
        for level, (tile_w, tile_h) in enumerate(self.tile_sizes):
            if tile_w * tile_h > MAX_DECODE_PIXELS:
                w, h = self.level_dimensions[level]
                raise SlideOpenError(
                    f"Cannot open {name}: its {w}x{h} px level {level} is stored in {tile_w}x{tile_h} px "
                    f"pieces ({megapixels(tile_w * tile_h)} each, more than the "
                    f"{megapixels(MAX_DECODE_PIXELS)} decoded at once); convert it to a tiled pyramidal TIFF"
                )
        self.vendor = "ome-tiff" if self._tif.is_ome else "tiff"
        self.properties = {"tiff.ImageDescription": page.description or ""}
        mpp, note = _tiff_mpp(self._tif, page)
        self.mpp, self.mpp_note = mpp, note
        self.objective_power = _ome_objective(self._tif) if self._tif.is_ome else None
        self.associated_image_names = tuple(
            s.name.lower() or f"series{i}"
            for i, s in enumerate(self._tif.series[1:], start=1)
            if s.name.lower() in {"label", "macro", "thumbnail", "overview"}
        )

    def _keep_levels(self, keep: list[int]) -> None:
        self._levels = [self._levels[i] for i in keep]
        self._source_levels = [self._source_levels[i] for i in keep]
        self._arrays = {}

    def _simple_page(self, level: int) -> Any | None:
        """The level's single page when its segments can be read one by one, else None."""
        lv = self._levels[level]
        pages = getattr(lv, "pages", None) or [lv.keyframe]
        if len(pages) != 1:
            return None
        page = pages[0] if not hasattr(pages[0], "keyframe") else pages[0].keyframe
        page = lv.keyframe if page is None else page
        if getattr(page, "imagedepth", 1) != 1 or (page.planarconfig == 2 and page.samplesperpixel > 1):
            return None
        return page

    def _level_array(self, level: int) -> Any:
        with self._lock:
            if level not in self._arrays:
                import zarr

                store = self._tif.aszarr(series=0, level=self._source_levels[level])
                self._arrays[level] = zarr.open(store, mode="r")
            return self._arrays[level]

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        page = self._simple_page(level)
        if page is not None:
            return to_rgb_uint8(self._read_segments(page, level, x, y, width, height))
        array = self._level_array(level)  # rare layouts (planar RGB, several pages per level)
        index: list[Any] = []
        for axis in self._series_axes:
            if axis == "Y":
                index.append(slice(y, y + height))
            elif axis == "X":
                index.append(slice(x, x + width))
            elif axis == "S":
                index.append(slice(None))
            else:
                index.append(0)
        pixels = np.asarray(array[tuple(index)])
        kept = [axis for axis in self._series_axes if axis in "YXS"]
        if kept != sorted(kept, key="YXS".index):  # planar RGB (SYX): samples last
            pixels = np.transpose(pixels, [kept.index(axis) for axis in "YXS" if axis in kept])
        return to_rgb_uint8(pixels)

    def _read_segments(self, page: Any, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Decode only the tiles (or strips) under the region, synchronously."""
        image_w, image_h = int(page.imagewidth), int(page.imagelength)
        if page.is_tiled:
            seg_w, seg_h = int(page.tilewidth), int(page.tilelength)
        else:
            seg_w, seg_h = image_w, max(1, min(int(page.rowsperstrip or image_h), image_h))
        per_row = math.ceil(image_w / seg_w)
        samples = int(page.samplesperpixel)
        dtype = np.dtype(page.dtype)
        fill = np.iinfo(dtype).max if dtype.kind in "ui" else (1.0 if dtype.kind == "f" else True)
        out = np.full((height, width, samples), fill, dtype)
        offsets, counts = page.dataoffsets, page.databytecounts
        decode = page.decode
        for row in range(y // seg_h, (y + height - 1) // seg_h + 1):
            for col in range(x // seg_w, (x + width - 1) // seg_w + 1):
                index = row * per_row + col
                segment = self._segment(page, level, index, offsets, counts, decode)
                if segment is None:
                    continue  # an empty tile: white, as OpenSlide shows it
                sy, sx = row * seg_h, col * seg_w
                y0, y1 = max(y, sy), min(y + height, sy + seg_h, image_h)
                x0, x1 = max(x, sx), min(x + width, sx + seg_w, image_w)
                part = segment[y0 - sy : y1 - sy, x0 - sx : x1 - sx]
                out[y0 - y : y1 - y, x0 - x : x1 - x] = part.reshape(y1 - y0, x1 - x0, samples)
        return out[..., 0] if samples == 1 else out

    def _segment(
        self, page: Any, level: int, index: int, offsets: Any, counts: Any, decode: Any
    ) -> np.ndarray | None:
        if index >= len(offsets):
            raise SlideReadError(f"{self.display_name}: level {level} has no tile {index} (damaged file)")
        cached = self._segment_cache
        if cached is not None and cached[0] == (level, index):
            return cached[1]
        offset, count = int(offsets[index]), int(counts[index])
        if count <= 0 or offset <= 0:
            return None
        fh = self._tif.filehandle
        with self._lock:
            fh.seek(offset)
            data = fh.read(count)
        if len(data) < count:
            raise SlideReadError(
                f"{self.display_name} is truncated: tile {index} of level {level} lies past the end "
                "of the file"
            )
        segment, _, shape = decode(data, index, jpegtables=page.jpegtables)
        if segment is None:
            return None
        segment = np.asarray(segment).reshape(shape[1], shape[2], shape[3])
        if segment.shape[0] * segment.shape[1] > 2**20:
            self._segment_cache = ((level, index), segment)  # big strips: decoded once for many reads
        return segment

    def read_associated_image(self, name: str) -> np.ndarray:
        """Read a label/macro/thumbnail series as RGB uint8."""
        for series in self._tif.series[1:]:
            if series.name.lower() == name:
                pixels = math.prod(int(v) for v in series.shape)
                if pixels > 3 * MAX_DECODE_PIXELS:
                    raise SlideReadError(
                        f"the {name} image of {self.display_name} is too large to read "
                        f"({megapixels(pixels / 3)})"
                    )
                return to_rgb_uint8(series.asarray())
        return super().read_associated_image(name)

    def close(self) -> None:
        """Close the TIFF file."""
        self._tif.close()


def _tiff_tile_size(page: Any) -> tuple[int, int]:
    if page.is_tiled:
        return int(page.tilewidth), int(page.tilelength)
    rows = int(page.rowsperstrip or page.imagelength)
    return int(page.imagewidth), max(1, min(rows, int(page.imagelength)))


def _tiff_mpp(tif: Any, page: Any) -> tuple[tuple[float, float] | None, str]:
    if tif.is_ome:
        import xml.etree.ElementTree as ET

        try:
            root = ET.fromstring(tif.ome_metadata)
            pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
            to_um = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}
            unit = to_um.get(pixels.get("PhysicalSizeXUnit", "µm"), 1.0)
            mx = float(pixels.get("PhysicalSizeX")) * unit
            my = float(pixels.get("PhysicalSizeY", mx / unit)) * unit
        except (StopIteration, TypeError, ValueError, ET.ParseError):
            mx = my = None
        if mx:
            mx_ok, note = checked_mpp(mx, "OME PhysicalSize")
            if mx_ok:
                return (mx_ok, my or mx_ok), note
    unit = int(page.tags.valueof("ResolutionUnit", 1) or 1)
    per_unit = {2: 25_400.0, 3: 10_000.0}.get(unit)  # inch, centimetre in um
    if per_unit is None:
        return None, "the file records no um/px (TIFF resolution has no unit)"
    try:
        res_x, res_y = page.get_resolution()
    except Exception:
        return None, "the file records no um/px"
    if not res_x:
        return None, "the file records no um/px"
    mx, note = checked_mpp(per_unit / res_x, "TIFF resolution tags")
    if mx is None:
        return None, note
    return (mx, per_unit / res_y if res_y else mx), note


def _ome_objective(tif: Any) -> float | None:
    import re

    match = re.search(r'NominalMagnification="([0-9.]+)"', tif.ome_metadata or "")
    return float(match.group(1)) if match else None


# --------------------------------------------------------------------------- plain images


class ImageBackend(BaseBackend):
    """A plain PNG/JPEG (or small TIFF) tile as a single level, decoded on first read."""

    name = "image"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = str(path)
        name = Path(path).name
        try:
            image = open_image_checked(self.path, "image", 4 * MAX_DECODE_PIXELS, bytes_per_pixel=4)
        except ValueError as exc:
            unknown = "not an image file" in str(exc)
            raise (UnsupportedFormatError if unknown else SlideOpenError)(str(exc)) from None
        except OSError as exc:
            raise SlideOpenError(f"Cannot open {name}: {exc}") from exc
        try:
            with image:
                image.verify()  # header and structure only; no full decode
            width, height = image.size
            dpi = image.info.get("dpi")
            self.vendor = (image.format or "image").lower()
        except Exception as exc:
            raise SlideOpenError(f"Cannot open {name}: {exc}") from exc
        self.level_dimensions = ((int(width), int(height)),)
        self.level_downsamples = (1.0,)
        self.tile_sizes = ((min(width, 1024), min(height, 1024)),)
        try:
            mpp, note = checked_mpp(25_400.0 / float(dpi[0]) if dpi else None, "image dpi")
        except (TypeError, ValueError, ZeroDivisionError, IndexError):
            mpp, note = None, "the file records no um/px"
        self.mpp = (mpp, mpp) if mpp else None
        self.mpp_note = note
        self.properties = {}
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()

    def _decoded(self) -> np.ndarray:
        with self._lock:
            if self._pixels is None:
                checked = open_image_checked(self.path, "image", 4 * MAX_DECODE_PIXELS, bytes_per_pixel=4)
                with checked as image:
                    image.load()
                    mode = "RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB"
                    self._pixels = to_rgb_uint8(np.asarray(image.convert(mode)))
            return self._pixels

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self._decoded()[y : y + height, x : x + width].copy()


# --------------------------------------------------------------------------- in memory


class InMemoryBackend(BaseBackend):
    """Levels held as numpy arrays or any array-like with ``shape`` and slicing.

    Parameters
    ----------
    levels : sequence of array-like
        ``(height, width, 3)`` (or gray / RGBA) arrays, level 0 first. Objects
        that compute pixels on demand (a procedural slide) are fine: only the
        requested region is sliced.
    mpp : float or (float, float), optional
        Micrometres per pixel at level 0.
    tile_size : int
        The tile grid reported for chunking.
    objective_power : float, optional
        Nominal objective magnification.
    associated_images : mapping, optional
        Extra named images (label, macro, thumbnail).
    vendor : str
        Shown in slide facts.

    """

    name = "memory"

    def __init__(
        self,
        levels: Sequence[Any],
        mpp: float | tuple[float, float] | None = None,
        *,
        tile_size: int = 256,
        objective_power: float | None = None,
        associated_images: Mapping[str, np.ndarray] | None = None,
        vendor: str = "memory",
        path: str | None = None,
    ) -> None:
        super().__init__()
        if not levels:
            raise ValueError("an in-memory slide needs at least one level")
        self._levels = list(levels)
        self.path = path
        self.vendor = vendor
        self.level_dimensions = tuple((int(a.shape[1]), int(a.shape[0])) for a in self._levels)
        w0 = self.level_dimensions[0][0]
        self.level_downsamples = tuple(w0 / w for w, _ in self.level_dimensions)
        self.tile_sizes = tuple((tile_size, tile_size) for _ in self._levels)
        if mpp is None:
            self.mpp, self.mpp_note = None, "no um/px was given"
        else:
            mx, my = (mpp, mpp) if np.isscalar(mpp) else mpp  # type: ignore[misc]
            self.mpp, self.mpp_note = (float(mx), float(my)), "given"
        self.objective_power = objective_power
        self._associated = dict(associated_images or {})
        self.associated_image_names = tuple(self._associated)
        self.properties = {}

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return to_rgb_uint8(np.asarray(self._levels[level][y : y + height, x : x + width]))

    def read_associated_image(self, name: str) -> np.ndarray:
        """Return a stored associated image."""
        if name in self._associated:
            return to_rgb_uint8(self._associated[name])
        return super().read_associated_image(name)
