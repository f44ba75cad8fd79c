"""Damaged TIFF files: tifffile's log collected, pages whose data lies past the end found."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


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
