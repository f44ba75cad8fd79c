"""The lazy dask pyramid of a slide: the file's levels and the small levels computed from them.

Chunks follow the file's tile grid; levels the file lacks, down to
:data:`TOP_LEVEL_SIDE`, are area averages of its coarsest level, read in
bounded blocks. A slide whose coarsest level exceeds
:data:`MAX_UNPYRAMIDED_PIXELS` is refused (:func:`_check_pyramid`).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import dask.array as da
import numpy as np
from dask.base import tokenize

from napari_pathology.slide.backends import SlideBackend, SlideOpenError, SlideReadError, megapixels

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


def file_level(
    backend: SlideBackend, name: str, level: int, on_error: Callable[[SlideReadError], None] | None
) -> da.Array:
    """One level of the file as a lazy dask array, chunked along the file's own tile grid."""
    width, height = backend.level_dimensions[level]
    tile_w, tile_h = backend.tile_sizes[level]
    chunk_w = tile_w * max(1, math.ceil(MIN_CHUNK / tile_w))
    chunk_h = tile_h * max(1, math.ceil(MIN_CHUNK / tile_h))
    reader = _LevelReader(backend, level, on_error)
    token = tokenize(backend.path, _file_stamp(backend.path), id(backend), level, on_error)
    return da.from_array(
        reader,
        chunks=(min(chunk_h, height), min(chunk_w, width), 3),
        name=f"slide-{Path(name).stem}-L{level}-{token}",
        asarray=False,
        fancy=False,
        lock=False,
        inline_array=True,
        meta=np.empty((0, 0, 3), np.uint8),
    )


def computed_levels(
    backend: SlideBackend, name: str, on_error: Callable[[SlideReadError], None] | None
) -> list[da.Array]:
    """Levels the file lacks, down to :data:`TOP_LEVEL_SIDE`, computed from the coarsest level."""
    source = len(backend.level_dimensions) - 1
    width, height = backend.level_dimensions[source]
    levels: list[da.Array] = []
    factor = 1
    while max(math.ceil(width / factor), math.ceil(height / factor)) > TOP_LEVEL_SIDE:
        factor *= 2
        reader = _ComputedLevelReader(backend, source, factor, on_error)
        h, w = reader.shape[:2]
        token = tokenize(backend.path, _file_stamp(backend.path), id(backend), source, factor, on_error)
        levels.append(
            da.from_array(
                reader,
                chunks=(min(COMPUTED_CHUNK, h), min(COMPUTED_CHUNK, w), 3),
                name=f"slide-{Path(name).stem}-L{source}x{factor}-{token}",
                asarray=False,
                fancy=False,
                lock=False,
                inline_array=True,
                meta=np.empty((0, 0, 3), np.uint8),
            )
        )
    return levels


def _read_or_fill(
    backend: SlideBackend,
    level: int,
    x: int,
    y: int,
    width: int,
    height: int,
    on_error: Callable[[SlideReadError], None] | None,
) -> np.ndarray:
    """Read a box of a file level; with ``on_error`` a box that fails to decode is reported and grey."""
    try:
        return backend.read_region(level, x, y, width, height)
    except SlideReadError as exc:
        if on_error is None:
            raise
        on_error(exc)
        return np.full((height, width, 3), UNREADABLE_FILL, np.uint8)


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
        region = _read_or_fill(self.backend, self.level, x0, y0, x1 - x0, y1 - y0, self.on_error)
        return region[:, :, key[2]] if len(key) > 2 else region


class _ComputedLevelReader(_LevelReader):
    """A level the file lacks: each read area-averages ``factor`` x ``factor`` pixels of file level ``level``.

    Only the part of the source level under the request is read, in blocks of
    at most about :data:`_SOURCE_BLOCK` pixels per side, so memory stays bounded
    whatever the slide's size.
    """

    def __init__(
        self,
        backend: SlideBackend,
        level: int,
        factor: int,
        on_error: Callable[[SlideReadError], None] | None,
    ) -> None:
        super().__init__(backend, level, on_error)
        self.factor = int(factor)
        height, width = self.source_shape = self.shape[:2]
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
                block = _read_or_fill(self.backend, self.level, sx0, sy0, sx1 - sx0, sy1 - sy0, self.on_error)
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


def _file_stamp(path: str | None) -> tuple[float, int] | None:
    if not path:
        return None
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_mtime, stat.st_size


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
