"""Tile grids at a model's um/px, tile reading, batching and test-time augmentation.

A model sees square tiles of ``tile_size`` pixels at ``target_mpp`` micrometres
per pixel. :func:`make_tile_grid` lays a regular grid of such tiles over the
whole slide in *physical* coordinates (micrometres from the slide's top-left
corner, x right, y down), keeps the tiles that hold enough tissue, and picks
the pyramid level to read from. :func:`read_tile` reads one tile at exactly
``target_mpp``; :class:`TileLoader` reads batches in background threads so
reading overlaps compute. :func:`to_tensor`, :func:`dihedral` and
:func:`tta_mean` turn batches into normalised tensors and average the eight
orientations.

Grid geometry
-------------
Cell ``(r, c)`` has its tile origin (top-left) at physical
``(x, y) = (c * stride * target_mpp, r * stride * target_mpp)`` um, and its
tile centre ``tile_size * target_mpp / 2`` um further right and down. The
heatmap value of a cell stands for the tile's centre region (``stride`` px,
e.g. Liu et al.'s 128 px label region of a 299 px tile), so heatmap cell
``(r, c)`` is centred at ``first_centre_um + (r, c) * cell_um``. The grid has
``ceil(slide size / cell_um)`` rows and columns; the last tiles may reach past
the slide's edge and are read padded with white (``read_region`` pads).

Nothing here imports Qt or napari; torch is imported only by the tensor helpers.

Examples
--------
>>> import numpy as np
>>> from napari_pathology.slide import InMemoryBackend, Slide
>>> slide = Slide(InMemoryBackend([np.full((1000, 1500, 3), 200, np.uint8)], mpp=0.5))
>>> grid = make_tile_grid(slide, target_mpp=1.0, tile_size=100)
>>> grid.shape, len(grid), grid.cell_um, grid.first_centre_um
((5, 8), 40, 100.0, (50.0, 50.0))
>>> read_tile(slide, grid, 0).shape
(100, 100, 3)

"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from napari_pathology.geometry import area_below, summed_area_table

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATIONS",
    "MaskLike",
    "TileGrid",
    "TileLoader",
    "dihedral",
    "make_tile_grid",
    "normalize_unit",
    "read_patch",
    "read_tile",
    "tissue_fractions",
    "to_tensor",
    "tta_mean",
]

#: Input normalisations a model can declare (see :func:`to_tensor`).
NORMALIZATIONS = ("imagenet", "liu", "unit")
#: Relative um/px difference read without resampling (and by which a level may be coarser).
MPP_TOLERANCE = 0.05
#: Most cells a tile grid may have (a stride far too small for the slide is refused, not allocated).
MAX_GRID_CELLS = 20_000_000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Tissue fractions below this count as zero (summed-area-table round-off).
_FRACTION_EPS = 1e-6


@runtime_checkable
class MaskLike(Protocol):
    """A boolean tissue mask with its physical pixel size.

    Mask pixel ``(r, c)`` covers the physical square
    ``[c * mpp, (c + 1) * mpp) x [r * mpp, (r + 1) * mpp)`` um from the slide's
    top-left corner. ``tissue.TissueMask`` is one; any object with these two
    attributes will do.
    """

    mask: np.ndarray
    mpp: float


@dataclass(frozen=True, eq=False)
class TileGrid:
    """The tiles a model sees on one slide, at the model's um/px.

    Attributes
    ----------
    target_mpp : float
        um/px of the tiles given to the model.
    tile_size : int
        Model input side in px at ``target_mpp``.
    stride : int
        px at ``target_mpp`` between neighbouring tile origins.
    level : int
        Pyramid level read.
    level_mpp : float
        um/px of that level along x (level-0 ``mpp_x`` times the level's downsample).
    shape : tuple of int
        ``(rows, cols)`` of the full grid covering the slide.
    cells : ndarray
        ``(N, 2)`` int64 ``(row, col)`` of the kept tiles, row-major order.
    tissue_fraction : ndarray
        ``(N,)`` float32 tissue fraction of each kept tile's centre region
        (1.0 without a mask).
    slide_mpp : tuple of float
        Level-0 ``(mpp_x, mpp_y)``.
    slide_size : tuple of int
        Level-0 ``(width, height)`` in px.
    mpp_tolerance : float
        Relative um/px difference accepted without resampling.

    """

    target_mpp: float
    tile_size: int
    stride: int
    level: int
    level_mpp: float
    shape: tuple[int, int]
    cells: np.ndarray
    tissue_fraction: np.ndarray
    slide_mpp: tuple[float, float]
    slide_size: tuple[int, int]
    mpp_tolerance: float = MPP_TOLERANCE

    def __len__(self) -> int:
        return len(self.cells)

    # ------------------------------------------------------------------ physical geometry
    @property
    def cell_um(self) -> float:
        """Distance in um between neighbouring tiles (and heatmap cells)."""
        return self.stride * self.target_mpp

    @property
    def tile_um(self) -> float:
        """Side of one tile in um."""
        return self.tile_size * self.target_mpp

    @property
    def origins_um(self) -> np.ndarray:
        """``(N, 2)`` physical ``(x, y)`` of each tile's top-left corner, um."""
        return self.cells[:, ::-1].astype(np.float64) * self.cell_um

    @property
    def centres_um(self) -> np.ndarray:
        """``(N, 2)`` physical ``(x, y)`` of each tile's centre, um."""
        return self.origins_um + self.tile_um / 2.0

    @property
    def first_centre_um(self) -> tuple[float, float]:
        """Physical ``(y, x)`` centre of cell ``(0, 0)``, um."""
        half = self.tile_um / 2.0
        return (half, half)

    # ------------------------------------------------------------------ reading
    @property
    def level_downsample(self) -> float:
        """Downsample of the level read, relative to level 0."""
        return self.level_mpp / self.slide_mpp[0]

    @property
    def level_mpp_xy(self) -> tuple[float, float]:
        """``(mpp_x, mpp_y)`` of the level read."""
        ds = self.level_downsample
        return self.slide_mpp[0] * ds, self.slide_mpp[1] * ds

    @property
    def direct(self) -> bool:
        """Whether tiles are read without resampling (level um/px within tolerance of the target)."""
        return all(abs(m / self.target_mpp - 1.0) <= self.mpp_tolerance for m in self.level_mpp_xy)

    def level_box(self, i: int) -> tuple[float, float, float, float]:
        """The ``(x, y, w, h)`` region of the read level (float level px) that tile ``i`` covers."""
        row, col = (int(v) for v in self.cells[i])
        mx, my = self.level_mpp_xy
        x_um, y_um = col * self.cell_um, row * self.cell_um
        return x_um / mx, y_um / my, self.tile_um / mx, self.tile_um / my

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready geometry (without the per-tile arrays)."""
        return {
            "target_mpp": self.target_mpp,
            "tile_size": self.tile_size,
            "stride": self.stride,
            "level": self.level,
            "level_mpp": self.level_mpp,
            "shape": list(self.shape),
            "n_tiles": len(self),
            "cell_um": self.cell_um,
            "first_centre_um": list(self.first_centre_um),
            "slide_mpp": list(self.slide_mpp),
            "slide_size": list(self.slide_size),
        }

    def __repr__(self) -> str:
        return (
            f"<TileGrid {len(self)}/{self.shape[0] * self.shape[1]} tiles of {self.tile_size}px "
            f"@ {self.target_mpp:g} um/px, stride {self.stride}, level {self.level} "
            f"({self.level_mpp:.4g} um/px){'' if self.direct else ', resampled'}>"
        )


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _choose_level(slide: Any, mpp: tuple[float, float], target_mpp: float, tolerance: float) -> int:
    limit = target_mpp * (1.0 + tolerance)
    best: int | None = None
    for level, ds in enumerate(slide.level_downsamples):
        if max(mpp) * ds <= limit and (best is None or ds > slide.level_downsamples[best]):
            best = level
    if best is None:
        finest = max(mpp) * min(slide.level_downsamples)
        raise ValueError(
            f"The slide {slide.name} ({finest:.4g} um/px at full resolution) cannot reach the model's "
            f"{target_mpp:.4g} um/px: it was scanned at a lower magnification than the model needs "
            f"(tolerance {tolerance:.0%}). Use a model for a coarser um/px, or check the slide's um/px."
        )
    return best


def tissue_fractions(tissue: MaskLike, x0_um: np.ndarray, y0_um: np.ndarray, side_um: float) -> np.ndarray:
    """Tissue fraction of axis-aligned squares, exact for fractional mask-pixel overlap.

    Parameters
    ----------
    tissue : MaskLike
        Boolean mask and its um per mask pixel.
    x0_um, y0_um : ndarray
        Top-left corners of the squares, um.
    side_um : float
        Side of every square, um.

    Returns
    -------
    ndarray
        float32 fractions in [0, 1]; parts of a square outside the mask count
        as background.

    """
    mask = np.asarray(tissue.mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"a tissue mask must be 2-D, got shape {mask.shape}")
    mask_mpp = float(tissue.mpp)
    if not math.isfinite(mask_mpp) or mask_mpp <= 0:
        raise ValueError(f"tissue mask um/px must be positive, got {tissue.mpp!r}")
    x0 = np.asarray(x0_um, np.float64) / mask_mpp
    y0 = np.asarray(y0_um, np.float64) / mask_mpp
    side = side_um / mask_mpp
    if mask.size == 0 or side <= 0:
        return np.zeros(np.broadcast(x0, y0).shape, np.float32)
    sat = summed_area_table(mask)
    x1, y1 = x0 + side, y0 + side
    area = area_below(sat, x1, y1) - area_below(sat, x0, y1) - area_below(sat, x1, y0)
    area += area_below(sat, x0, y0)
    fraction = np.clip(area / (side * side), 0.0, 1.0)
    fraction[fraction < _FRACTION_EPS] = 0.0
    return fraction.astype(np.float32)


def make_tile_grid(
    slide: Any,
    target_mpp: float,
    tile_size: int,
    stride: int | None = None,
    *,
    tissue: MaskLike | None = None,
    min_tissue_fraction: float = 0.0,
    tissue_region_size: int | None = None,
    mpp_tolerance: float = MPP_TOLERANCE,
) -> TileGrid:
    """Lay a grid of model tiles over a slide and keep the tissue tiles.

    Parameters
    ----------
    slide : Slide
        An opened slide with um/px (from the file or set by the user).
    target_mpp : float
        um/px the model expects.
    tile_size : int
        Model input side in px at ``target_mpp``.
    stride : int, optional
        px at ``target_mpp`` between tile origins (default ``tile_size``).
    tissue : MaskLike, optional
        Tissue mask; without it every tile of the grid is kept.
    min_tissue_fraction : float
        Keep tiles whose centre region holds at least this tissue fraction
        (and some tissue at all, when a mask is given and this is 0).
    tissue_region_size : int, optional
        Side, px at ``target_mpp``, of the centred region the tissue fraction
        is measured over (default ``stride``: the part of the tile its heatmap
        cell stands for).
    mpp_tolerance : float
        Relative um/px difference accepted without resampling, and the
        margin by which a level may be coarser than the target.

    Returns
    -------
    TileGrid

    Raises
    ------
    SlideOpenError
        When the slide has no um/px.
    ValueError
        For bad arguments, or a slide whose full resolution is coarser than
        ``target_mpp``.

    """
    target_mpp = float(target_mpp)
    if not math.isfinite(target_mpp) or target_mpp <= 0:
        raise ValueError(f"target um/px must be a positive number, got {target_mpp!r}")
    tile_size = _positive_int(tile_size, "tile_size")
    stride = tile_size if stride is None else _positive_int(stride, "stride")
    region = stride if tissue_region_size is None else _positive_int(tissue_region_size, "tissue_region_size")
    if not 0.0 <= min_tissue_fraction <= 1.0:
        raise ValueError(f"min_tissue_fraction must be in [0, 1], got {min_tissue_fraction!r}")
    if not 0.0 <= mpp_tolerance < 1.0:
        raise ValueError(f"mpp_tolerance must be in [0, 1), got {mpp_tolerance!r}")

    mpp_x, mpp_y = (float(v) for v in slide.require_mpp())
    width, height = (int(v) for v in slide.dimensions)
    level = _choose_level(slide, (mpp_x, mpp_y), target_mpp, mpp_tolerance)
    level_mpp = mpp_x * float(slide.level_downsamples[level])

    cell_um = stride * target_mpp
    rows = max(1, math.ceil(height * mpp_y / cell_um - 1e-6))
    cols = max(1, math.ceil(width * mpp_x / cell_um - 1e-6))
    if rows * cols > MAX_GRID_CELLS:
        name = getattr(slide, "name", "the slide")
        raise ValueError(
            f"a stride of {stride} px at {target_mpp:g} um/px lays {cols} x {rows} tiles over {name}: "
            f"more than {MAX_GRID_CELLS:,}; use a larger stride"
        )
    rr, cc = np.meshgrid(np.arange(rows, dtype=np.int64), np.arange(cols, dtype=np.int64), indexing="ij")
    cells = np.stack([rr.ravel(), cc.ravel()], axis=1)
    if tissue is None:
        fraction = np.ones(len(cells), np.float32)
    else:
        centre_offset = (tile_size - region) / 2.0 * target_mpp
        x0 = cells[:, 1] * cell_um + centre_offset
        y0 = cells[:, 0] * cell_um + centre_offset
        fraction = tissue_fractions(tissue, x0, y0, region * target_mpp)
        keep = fraction >= min_tissue_fraction
        if min_tissue_fraction <= 0.0:
            keep &= fraction > 0.0
        cells, fraction = cells[keep], fraction[keep]
    return TileGrid(
        target_mpp=target_mpp,
        tile_size=tile_size,
        stride=stride,
        level=level,
        level_mpp=level_mpp,
        shape=(rows, cols),
        cells=_readonly(np.ascontiguousarray(cells, dtype=np.int64)),
        tissue_fraction=_readonly(np.ascontiguousarray(fraction, dtype=np.float32)),
        slide_mpp=(mpp_x, mpp_y),
        slide_size=(width, height),
        mpp_tolerance=float(mpp_tolerance),
    )


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def read_tile(slide: Any, grid: TileGrid, i: int) -> np.ndarray:
    """Read tile ``i`` of ``grid`` as ``(tile_size, tile_size, 3)`` RGB uint8 at ``target_mpp``.

    When the level's um/px matches the target within tolerance this is a
    single ``read_region`` of ``tile_size`` px at the rounded origin;
    otherwise the float level box is read (with a 1 px margin) and
    area-averaged (PIL box filter, i.e. antialiased) to exactly
    ``tile_size`` px. Parts outside the slide are white.

    Raises
    ------
    SlideReadError
        When the slide's pixels cannot be decoded.

    """
    return _read_level_box(slide, grid.level, grid.level_box(i), grid.tile_size, grid.direct)


def read_patch(slide: Any, centre_um: tuple[float, float], size: int, mpp: float) -> np.ndarray:
    """Read a ``size`` px square centred on ``centre_um = (x, y)`` at ``mpp`` um/px (RGB uint8).

    The level and the resampling are those :func:`make_tile_grid` and
    :func:`read_tile` use for grid tiles; parts outside the slide are white.
    Used to sample training patches anywhere.
    """
    mpp = float(mpp)
    slide_mpp = tuple(float(v) for v in slide.require_mpp())
    level = _choose_level(slide, slide_mpp, mpp, MPP_TOLERANCE)
    downsample = float(slide.level_downsamples[level])
    mx, my = slide_mpp[0] * downsample, slide_mpp[1] * downsample
    direct = all(abs(m / mpp - 1.0) <= MPP_TOLERANCE for m in (mx, my))
    side_um = size * mpp
    x0_um, y0_um = centre_um[0] - side_um / 2.0, centre_um[1] - side_um / 2.0
    return _read_level_box(slide, level, (x0_um / mx, y0_um / my, side_um / mx, side_um / my), size, direct)


def _read_level_box(
    slide: Any, level: int, box: tuple[float, float, float, float], size: int, direct: bool
) -> np.ndarray:
    """``size`` px RGB of the float ``(x, y, w, h)`` box of ``level``, area-resampled unless ``direct``."""
    x, y, w, h = box
    if direct:
        region = slide.read_region(level, round(x), round(y), size, size)
        return np.array(region, dtype=np.uint8, order="C", copy=True)  # never a view of the slide
    from PIL import Image

    margin = 1
    x0, y0 = math.floor(x) - margin, math.floor(y) - margin
    x1, y1 = math.ceil(x + w) + margin, math.ceil(y + h) + margin
    region = slide.read_region(level, x0, y0, x1 - x0, y1 - y0)
    image = Image.fromarray(np.ascontiguousarray(region))
    box_in_region = (x - x0, y - y0, x - x0 + w, y - y0 + h)
    return np.array(image.resize((size, size), Image.Resampling.BOX, box=box_in_region))  # writable


# --------------------------------------------------------------------------- batches


class TileLoader:
    """Read batches of tiles in background threads, a bounded number of batches ahead.

    Iterating yields ``(indices, tiles)``: ``indices`` ``(B,)`` int64 positions
    in the grid (rows of ``grid.cells``) and ``tiles`` ``(B, H, W, 3)`` uint8,
    in the order of ``indices``. While the consumer works on one batch, the
    next ``prefetch`` batches are being read by ``workers`` threads. A read
    error (e.g. :class:`~napari_pathology.slide.SlideReadError` for a corrupt
    tile) is re-raised in the consumer, same type, with the tile's index,
    cell and position in the message (and as ``tile_index``/``tile_cell``
    attributes). :meth:`close` (also on leaving a ``with`` block) cancels
    outstanding reads without waiting; an iteration in progress then stops.

    Parameters
    ----------
    slide : Slide
        The slide the grid was made for.
    grid : TileGrid
        Which tiles, at which um/px.
    batch_size : int
        Tiles per batch (the last batch may be smaller).
    indices : sequence of int, optional
        Grid positions to read, in this order (default: all).
    workers : int
        Reading threads (0 reads in the consumer's thread, without prefetch).
    prefetch : int
        Batches read ahead of the one being consumed.

    Examples
    --------
    >>> with TileLoader(slide, grid, batch_size=32) as loader:  # doctest: +SKIP
    ...     for indices, tiles in loader:
    ...         probs = model.predict_proba(to_tensor(tiles, "imagenet"))

    """

    def __init__(
        self,
        slide: Any,
        grid: TileGrid,
        batch_size: int,
        indices: Sequence[int] | None = None,
        workers: int = 2,
        prefetch: int = 2,
    ) -> None:
        self.slide = slide
        self.grid = grid
        self.batch_size = _positive_int(batch_size, "batch_size")
        if int(workers) < 0:
            raise ValueError(f"workers must be >= 0, got {workers!r}")
        self.workers = int(workers)
        self.prefetch = _positive_int(prefetch, "prefetch")
        order = np.arange(len(grid), dtype=np.int64) if indices is None else np.asarray(indices)
        order = order.astype(np.int64, copy=False).ravel()
        if len(order) and (order.min() < 0 or order.max() >= len(grid)):
            raise IndexError(f"tile indices must be in [0, {len(grid)}), got {order.min()}..{order.max()}")
        self.indices = order
        self._closed = threading.Event()
        self._started = False
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[np.ndarray, np.ndarray, list[Future[None]]]] = deque()

    def __len__(self) -> int:
        """Number of batches."""
        return math.ceil(len(self.indices) / self.batch_size)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed.is_set()

    def __enter__(self) -> TileLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel outstanding reads and release the threads; returns at once.

        A read already running finishes in its thread (one tile), its result
        is dropped. Safe to call several times and from another thread.
        """
        self._closed.set()
        with self._lock:
            executor, self._executor = self._executor, None
            pending = list(self._pending)
        for _, _, futures in pending:
            for future in futures:
                future.cancel()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ iteration
    def _batches(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.indices), self.batch_size):
            yield self.indices[start : start + self.batch_size]

    def _read_into(self, out: np.ndarray, j: int, index: int) -> None:
        if self._closed.is_set():
            return
        out[j] = read_tile(self.slide, self.grid, int(index))

    def _error(self, exc: BaseException, index: int) -> BaseException:
        row, col = (int(v) for v in self.grid.cells[index])
        x_um, y_um = col * self.grid.cell_um, row * self.grid.cell_um
        message = f"tile {index} (row {row}, col {col}, at x={x_um:.0f} um, y={y_um:.0f} um): {exc}"
        try:
            error = type(exc)(message)
        except Exception:
            error = RuntimeError(message)
        try:
            error.tile_index = int(index)  # type: ignore[attr-defined]
            error.tile_cell = (row, col)  # type: ignore[attr-defined]
        except AttributeError:
            pass
        return error

    def _submit(self, batch: np.ndarray) -> bool:
        size = self.grid.tile_size
        out = np.empty((len(batch), size, size, 3), np.uint8)
        with self._lock:
            if self._executor is None or self._closed.is_set():
                return False
            futures = [self._executor.submit(self._read_into, out, j, i) for j, i in enumerate(batch)]
            self._pending.append((batch, out, futures))
        return True

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with self._lock:
            if self._started:
                raise RuntimeError("a TileLoader can be iterated only once; make a new one")
            self._started = True
        if self.workers == 0:
            return self._iter_sync()
        return self._iter_threads()

    def _iter_sync(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        size = self.grid.tile_size
        for batch in self._batches():
            out = np.empty((len(batch), size, size, 3), np.uint8)
            for j, index in enumerate(batch):
                if self._closed.is_set():
                    return
                try:
                    out[j] = read_tile(self.slide, self.grid, int(index))
                except Exception as exc:
                    raise self._error(exc, int(index)) from exc
            if self._closed.is_set():
                return
            yield batch, out

    def _iter_threads(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with self._lock:
            if self._closed.is_set():
                return
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="tile-reader")
        batches = self._batches()
        try:
            for batch in _take(batches, self.prefetch):
                self._submit(batch)
            while True:
                with self._lock:
                    if not self._pending:
                        return
                    batch, out, futures = self._pending.popleft()
                for j, future in enumerate(futures):
                    try:
                        future.result()
                    except CancelledError:
                        return
                    except Exception as exc:
                        raise self._error(exc, int(batch[j])) from exc
                if self._closed.is_set():
                    return
                for following in _take(batches, 1):
                    self._submit(following)
                yield batch, out
                if self._closed.is_set():
                    return
        finally:
            self.close()


def _take(iterator: Iterator[np.ndarray], n: int) -> list[np.ndarray]:
    out = []
    for item in iterator:
        out.append(item)
        if len(out) == n:
            break
    return out


# --------------------------------------------------------------------------- tensors


def to_tensor(tiles: np.ndarray, normalization: str, device: Any = None) -> torch.Tensor:
    """Batch of RGB uint8 tiles to a normalised ``(B, 3, H, W)`` float32 tensor.

    Parameters
    ----------
    tiles : ndarray
        ``(B, H, W, 3)`` (or one ``(H, W, 3)`` tile) with values 0-255.
    normalization : {"imagenet", "liu", "unit"}
        ``imagenet``: ``(x / 255 - mean) / std`` with ImageNet statistics;
        ``liu``: ``x / 127.5 - 1`` in [-1, 1] (Liu et al. 2017);
        ``unit``: ``x / 255`` in [0, 1].
    device : str or torch.device, optional
        Move the uint8 batch there first (4x less to transfer than float).

    Returns
    -------
    torch.Tensor

    """
    import torch

    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r} (known: {', '.join(NORMALIZATIONS)})")
    array = np.asarray(tiles)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"tiles must be (B, H, W, 3) RGB, got shape {array.shape}")
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # torch warns on read-only memory
        array = array.copy()
    x = torch.from_numpy(array)
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return normalize_unit(x.div_(255.0), normalization)


def normalize_unit(x: torch.Tensor, normalization: str) -> torch.Tensor:
    """Normalise a float ``(B, 3, H, W)`` batch in [0, 1] (in place) as a model expects."""
    import torch

    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r} (known: {', '.join(NORMALIZATIONS)})")
    if normalization == "unit":
        return x
    if normalization == "liu":
        return x.mul_(2.0).sub_(1.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 orientations of ``x`` (last two dims).

    Rotates by 90 degrees ``k % 4`` times (``torch.rot90``), then flips the
    last dimension if ``k >= 4``; ``k = 0`` returns ``x`` itself.
    """
    import torch

    if not 0 <= int(k) < 8:
        raise ValueError(f"dihedral orientation must be in 0..7, got {k!r}")
    k = int(k)
    out = torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x
    return torch.flip(out, dims=(-1,)) if k >= 4 else out


def tta_mean(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean of ``fn`` over the 8 dihedral orientations of ``x`` (Liu et al.'s test-time augmentation).

    ``fn`` must return per-tile outputs without spatial dimensions (e.g.
    ``(B, n_classes)`` probabilities), which need no inverse transform.
    One orientation is evaluated at a time, so memory stays that of one call.
    """
    total = None
    for k in range(8):
        out = fn(dihedral(x, k))
        total = out.clone() if total is None else total.add_(out)
    assert total is not None
    return total / 8.0
