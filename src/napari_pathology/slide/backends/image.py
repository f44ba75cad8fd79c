"""Plain PNG/JPEG (or small TIFF) images as one-level slides."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from napari_pathology.slide.backends.base import BaseBackend, to_rgb_uint8
from napari_pathology.slide.backends.errors import SlideOpenError, UnsupportedFormatError
from napari_pathology.slide.backends.limits import MAX_DECODE_PIXELS, checked_mpp, open_image_checked


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
