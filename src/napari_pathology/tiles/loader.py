"""Batches of tiles read in background threads, a bounded number of batches ahead."""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from napari_pathology.tiles.grid import TileGrid, _positive_int
from napari_pathology.tiles.read import read_tile

__all__ = ["TileLoader"]


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
