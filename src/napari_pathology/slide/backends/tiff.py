"""OME-TIFF and other (pyramidal or plain) TIFF through tifffile, read segment by segment."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.slide.backends.base import BaseBackend, to_rgb_uint8
from napari_pathology.slide.backends.damage import _chain_cut, quiet_tifffile, tiff_damage
from napari_pathology.slide.backends.errors import SlideOpenError, SlideReadError, UnsupportedFormatError
from napari_pathology.slide.backends.limits import MAX_DECODE_PIXELS, checked_mpp, megapixels


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
