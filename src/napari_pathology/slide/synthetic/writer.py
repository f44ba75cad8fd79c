"""Writing a synthetic slide: block rendering in threads, the streamed pyramidal TIFF, entry points."""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import tifffile

from napari_pathology.fileio import atomic_path, ensure_writable_dir, output_error
from napari_pathology.progress import Progress, run_to_completion
from napari_pathology.slide.synthetic.render import _render_block
from napari_pathology.slide.synthetic.scene import _build_scene, _Scene
from napari_pathology.slide.synthetic.truth import (
    GENERATOR,
    SyntheticTruth,
    _write_truth,
    check_tumour_type,
)

_BLOCK = 1024  # level-0 render block (px), a multiple of the tile size


def _encode_tiles(strip: np.ndarray, tile: int, quality: int) -> list[bytes]:
    """JPEG-encode one row of tiles (``strip`` has at most ``tile`` rows)."""
    out = []
    w = strip.shape[1]
    for c in range(0, w, tile):
        t = strip[:, c : c + tile]
        if t.shape[0] != tile or t.shape[1] != tile:
            t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), mode="edge")
        out.append(
            imagecodecs.jpeg8_encode(
                np.ascontiguousarray(t),
                level=quality,
                colorspace="RGB",
                outcolorspace="YCBCR",
                subsampling=(2, 2),
            )
        )
    return out


def _down2(a: np.ndarray) -> np.ndarray:
    """2x2 box downsampling of uint8 RGB, duplicating the last odd row/column."""
    h, w = a.shape[:2]
    if h % 2 or w % 2:
        a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    s = a.astype(np.uint16)
    out = s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2] + 2
    return (out >> 2).astype(np.uint8)


def _block_job(
    scene: _Scene, r0: int, r1: int, c0: int, c1: int, tile: int, quality: int
) -> tuple[list[list[bytes]], np.ndarray]:
    rgb = _render_block(scene, r0, r1, c0, c1)
    tiles = [_encode_tiles(rgb[r : r + tile], tile, quality) for r in range(0, r1 - r0, tile)]
    return tiles, _down2(rgb)


class _Pyramid:
    """Streams reduced levels: buffers rows, encodes tile rows, cascades downsampling."""

    def __init__(
        self, dims: list[tuple[int, int]], tile: int, quality: int, pool: ThreadPoolExecutor
    ) -> None:
        self.dims = dims  # (width, height) of levels 1..n
        self.tile, self.quality, self.pool = tile, quality, pool
        self.pending = [np.zeros((0, w, 3), np.uint8) for w, _ in dims]
        self.carry = [np.zeros((0, w, 3), np.uint8) for w, _ in dims]
        self.tiles: list[list[Future[list[bytes]]]] = [[] for _ in dims]

    def push(self, k: int, rows: np.ndarray) -> None:
        if k >= len(self.dims) or len(rows) == 0:
            return
        buf = np.concatenate([self.pending[k], rows]) if len(self.pending[k]) else rows
        n_full = len(buf) // self.tile * self.tile
        for r in range(0, n_full, self.tile):
            self._emit(k, buf[r : r + self.tile])
        self.pending[k] = buf[n_full:]
        if k + 1 < len(self.dims):
            src = np.concatenate([self.carry[k], rows]) if len(self.carry[k]) else rows
            even = len(src) // 2 * 2
            self.carry[k] = src[even:]
            if even:
                self.push(k + 1, _down2(src[:even]))

    def _emit(self, k: int, rows: np.ndarray) -> None:
        rows = rows.copy()
        self.tiles[k].append(self.pool.submit(_encode_tiles, rows, self.tile, self.quality))

    def finish(self) -> None:
        for k in range(len(self.dims)):
            if len(self.pending[k]):
                self._emit(k, self.pending[k])
                self.pending[k] = self.pending[k][:0]
            if k + 1 < len(self.dims) and len(self.carry[k]):
                rest = self.carry[k]
                self.carry[k] = rest[:0]
                self.push(k + 1, _down2(rest))


class _Abort(Exception):
    pass


class _TiffWriterThread(threading.Thread):
    """Writes pages from tiles arriving on a queue (tifffile pulls an iterator)."""

    _STOP = object()

    def __init__(self, path: Path, pages: list[dict[str, Any]], bigtiff: bool) -> None:
        super().__init__(name="synthetic-tiff-writer", daemon=True)
        self.path, self.pages, self.bigtiff = path, pages, bigtiff
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=2048)
        self.error: BaseException | None = None

    def _tiles(self, n: int) -> Iterator[bytes]:
        for _ in range(n):
            item = self.queue.get()
            if item is self._STOP:
                raise _Abort
            yield item

    def run(self) -> None:
        try:
            with tifffile.TiffWriter(self.path, bigtiff=self.bigtiff) as tif:
                for page in self.pages:
                    page = dict(page)
                    n = page.pop("n_tiles")
                    tif.write(self._tiles(n), **page)
        except BaseException as exc:  # reported to the producer
            self.error = exc

    def failure(self) -> BaseException:
        """The writer's error as the producer should raise it (a full disk is one line)."""
        if isinstance(self.error, OSError):
            return output_error(self.error, self.path.parent)
        return RuntimeError(f"writing {self.path.name} failed: {self.error}")

    def put(self, item: Any) -> None:
        while True:
            if self.error is not None:
                raise self.failure() from self.error
            if not self.is_alive():
                raise RuntimeError(f"TIFF writer for {self.path} stopped unexpectedly")
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def abort(self) -> None:
        if self.is_alive():
            try:
                while True:
                    self.queue.get_nowait()
            except queue.Empty:
                pass
            try:
                self.queue.put_nowait(self._STOP)
            except queue.Full:  # pragma: no cover
                pass
        self.join(timeout=30)


def _level_dims(width: int, height: int) -> list[tuple[int, int]]:
    dims = [(width, height)]
    while min(dims[-1]) > 1024:
        w, h = dims[-1]
        dims.append(((w + 1) // 2, (h + 1) // 2))
    return dims


def _n_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _parse_size(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        width = height = int(size)
    else:
        width, height = (int(s) for s in size)
    if width < 256 or height < 256:
        raise ValueError(f"synthetic slides must be at least 256 x 256 px, got {width} x {height}")
    return width, height


def generate_synthetic_slide(
    path: str | os.PathLike[str],
    size: int | tuple[int, int] = 20_000,
    seed: int = 0,
    *,
    negative: bool = False,
    tumour_size: str = "macro",
    mpp: float = 0.5,
    pen_mark: bool = False,
    blurred_patch: bool = False,
    tile_size: int = 256,
    jpeg_quality: int = 85,
    tumour_type: str | None = None,
) -> Generator[Progress, None, SyntheticTruth]:
    """Write a synthetic H&E whole-slide image and its ground truth.

    Parameters
    ----------
    path : path-like
        Output TIFF (e.g. ``OUT.tif``); sidecars are written beside it.
    size : int or tuple of int
        Level-0 size, square or ``(width, height)``, in pixels.
    seed : int
        Random seed; the same arguments give identical pixels and truth.
    negative : bool
        No tumour (label ``"normal"``).
    tumour_size : {"macro", "micro"}
        1-3 lesions of ~0.5-3 mm, or one ~0.2-0.6 mm micro-metastasis
        (scaled down on small slides).
    mpp : float
        Level-0 micrometres per pixel (0.25-1.0 recommended).
    pen_mark : bool
        Add a green or blue marker stroke.
    blurred_patch : bool
        Render a region out of focus.
    tile_size : int
        TIFF tile size (multiple of 16).
    jpeg_quality : int
        JPEG quality (1-100).
    tumour_type : {"A", "B"}, optional
        The tumour's type (see :data:`TUMOUR_TYPES`); ``None`` is ``"A"``, the
        generator's original tumour, whose pixels never change. A normal slide
        (``negative``) has none: giving one is refused.

    Yields
    ------
    Progress
        Work done, in level-0 blocks.

    Returns
    -------
    SyntheticTruth
        Paths and facts of what was written.

    """
    width, height = _parse_size(size)
    if tumour_size not in ("macro", "micro"):
        raise ValueError(f"tumour_size must be 'macro' or 'micro', got {tumour_size!r}")
    mpp = float(mpp)
    if not 0.05 <= mpp <= 10.0:
        raise ValueError(f"mpp must be in [0.05, 10], got {mpp}")
    tile = int(tile_size)
    if tile < 16 or tile % 16:
        raise ValueError(f"tile_size must be a positive multiple of 16, got {tile_size}")
    quality = int(jpeg_quality)
    if not 1 <= quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    kind = check_tumour_type(tumour_type, bool(negative))
    path = Path(path)
    ensure_writable_dir(path.parent)  # a read-only or missing output folder is said before the work
    options = {
        "negative": bool(negative),
        "tumour_size": tumour_size,
        "pen_mark": bool(pen_mark),
        "blurred_patch": bool(blurred_patch),
        "tile_size": tile,
        "jpeg_quality": quality,
        "tumour_type": kind,
    }

    block = max(tile, _BLOCK // tile * tile)
    strips = list(range(0, height, block))
    cols = list(range(0, width, block))
    total = len(strips) * len(cols) + 2
    yield Progress(0, total, "building scene")
    flags = (bool(negative), tumour_size, bool(pen_mark), bool(blurred_patch))
    scene = _build_scene(width, height, mpp, seed, *flags, tumour_type=kind or "A")
    yield Progress(1, total, "rendering")

    levels = _level_dims(width, height)
    common = {
        "dtype": np.uint8,
        "tile": (tile, tile),
        "compression": "jpeg",
        "photometric": "rgb",
        "subsampling": (2, 2),
        "metadata": None,
        "software": "napari-pathology",
    }
    pages = []
    for k, (w, h) in enumerate(levels):
        page = dict(common, shape=(h, w, 3), n_tiles=math.ceil(h / tile) * math.ceil(w / tile))
        if k == 0:
            page["description"] = f"{GENERATOR}; seed={int(seed)}; mpp={mpp:g}"
            page["resolution"] = (1e4 / mpp, 1e4 / mpp)
            page["resolutionunit"] = "CENTIMETER"
        else:
            page["subfiletype"] = 1
            page["resolution"] = (1e4 / mpp / 2**k, 1e4 / mpp / 2**k)
            page["resolutionunit"] = "CENTIMETER"
        pages.append(page)
    bigtiff = width * height * 3 * 4 // 3 > 2**31 - 2**26
    # The TIFF is written to a temporary file beside ``path`` and moved over it only when
    # complete: a full disk, an error or an interrupt never leaves a torn slide or removes an old one.
    with atomic_path(path, suffix=path.suffix) as tmp:
        writer = _TiffWriterThread(tmp, pages, bigtiff)
        pool = ThreadPoolExecutor(max_workers=_n_workers(), thread_name_prefix="synthetic")
        pyramid = _Pyramid(levels[1:], tile, quality, pool)
        finished = False
        writer.start()
        try:
            in_flight: dict[int, list[Future[tuple[list[list[bytes]], np.ndarray]]]] = {}

            def submit(s: int) -> None:
                r0 = strips[s]
                r1 = min(height, r0 + block)
                in_flight[s] = [
                    pool.submit(_block_job, scene, r0, r1, c0, min(width, c0 + block), tile, quality)
                    for c0 in cols
                ]

            lookahead = max(1, math.ceil(2 * _n_workers() / len(cols)))
            for s in range(min(lookahead + 1, len(strips))):
                submit(s)
            done = 1
            for s in range(len(strips)):
                results = [f.result() for f in in_flight.pop(s)]
                if s + lookahead + 1 < len(strips):
                    submit(s + lookahead + 1)
                n_tile_rows = len(results[0][0])
                for tr in range(n_tile_rows):
                    for tiles, _ in results:
                        for data in tiles[tr]:
                            writer.put(data)
                if len(levels) > 1:
                    pyramid.push(0, np.concatenate([down for _, down in results], axis=1))
                done += len(cols)
                yield Progress(done, total, f"rendered strip {s + 1}/{len(strips)}")
            pyramid.finish()
            for k, futures in enumerate(pyramid.tiles):
                for fut in futures:
                    for data in fut.result():
                        writer.put(data)
                yield Progress(done, total, f"wrote level {k + 1}/{len(levels) - 1}")
            writer.join()
            if writer.error is not None:
                raise writer.failure() from writer.error
            finished = True
        finally:
            if not finished:
                writer.abort()
                pool.shutdown(wait=True, cancel_futures=True)
            else:
                pool.shutdown(wait=True)
        # the truth files first, then the slide replaces any old one: a failure leaves the old slide
        truth = _write_truth(scene, path, seed, options, levels)
    yield Progress(total, total, "done")
    return truth


def write_synthetic_slide(
    path: str | os.PathLike[str], size: int | tuple[int, int] = 20_000, seed: int = 0, **kwargs: Any
) -> SyntheticTruth:
    """Write a synthetic slide, blocking until done.

    Parameters
    ----------
    path : path-like
        Output TIFF.
    size : int or tuple of int
        Level-0 size in pixels.
    seed : int
        Random seed.
    **kwargs
        Passed to :func:`generate_synthetic_slide`.

    Returns
    -------
    SyntheticTruth
        Paths and facts of what was written.

    """
    return run_to_completion(generate_synthetic_slide(path, size, seed, **kwargs))
