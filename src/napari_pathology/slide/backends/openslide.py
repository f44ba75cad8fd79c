"""Slides OpenSlide reads: SVS, NDPI, MRXS, SCN, VMS/VMU, BIF, generic tiled TIFF, DICOM WSI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.slide.backends.base import BaseBackend, rgba_to_rgb_on_white, to_rgb_uint8
from napari_pathology.slide.backends.errors import SlideOpenError, UnsupportedFormatError
from napari_pathology.slide.backends.limits import checked_mpp


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
