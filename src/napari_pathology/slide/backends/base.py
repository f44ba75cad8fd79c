"""The backend protocol, the shared read bookkeeping and pixel conversion to RGB uint8."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from napari_pathology.slide.backends.errors import RegionTooLargeError, SlideOpenError, SlideReadError
from napari_pathology.slide.backends.limits import MAX_REGION_PIXELS, megapixels

WHITE = 255


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
