"""Nucleus detection over a whole slide or a region, chunk by chunk, as a progress generator.

Nuclei need full resolution, so level 0 is read in square chunks of ``chunk_px``
pixels, each read with an ``overlap_um`` margin so that nuclei on a chunk's edge
are seen whole. A nucleus is kept only by the chunk whose *core* (the chunk
without its margin) holds its centroid: cores tile the region exactly, so a
nucleus on a border is counted once. With a tissue mask, chunks without tissue
are skipped.

With the built-in detector, one haematoxylin threshold is estimated for the
whole run at the start (Otsu over a few sample boxes spread over the planned
chunks) and given to every chunk, so the result hardly depends on the chunk size
(see :func:`detect_in_slide`).

No Qt, no napari.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np

from napari_pathology.nuclei.detect import (
    CSV_COLUMNS,
    DETECTORS,
    NucleusParams,
    NucleusTable,
    detect_nuclei,
    estimate_threshold,
)
from napari_pathology.progress import Progress

#: Name of the detector used when none is given.
DEFAULT_DETECTOR = "hematoxylin-watershed"
#: Sample boxes read to estimate a run's threshold, and their side in level-0 pixels.
THRESHOLD_SAMPLES = 8
THRESHOLD_SAMPLE_PX = 1024


@dataclass(frozen=True)
class Chunk:
    """One unit of work: a core box that owns the nuclei found in it, and the larger box read.

    Boxes are ``(x0, y0, x1, y1)`` in level-0 pixels, end exclusive; ``row`` and ``col``
    place the chunk in the region's chunk grid.
    """

    core: tuple[int, int, int, int]
    read: tuple[int, int, int, int]
    row: int = 0
    col: int = 0


def region_box_px(
    slide: Any, region_um: Sequence[float] | None = None
) -> tuple[tuple[int, int, int, int], tuple[float, float, float, float]]:
    """Level-0 pixel box covering a region, and the region itself clipped to the slide.

    Parameters
    ----------
    slide : Slide
        An opened slide with um/px.
    region_um : (x, y, w, h), optional
        Region in micrometres in the level-0 frame (origin at the top-left corner);
        None for the whole slide.

    Returns
    -------
    box_px : (x0, y0, x1, y1)
        Smallest pixel box holding the region (end exclusive).
    box_um : (x0, y0, x1, y1)
        The region in micrometres, clipped to the slide.

    Raises
    ------
    SlideOpenError
        When the slide has no um/px.
    ValueError
        For a malformed region or one outside the slide.

    """
    mpp_x, mpp_y = slide.require_mpp()
    width, height = slide.dimensions
    full = (0.0, 0.0, width * mpp_x, height * mpp_y)
    if region_um is None:
        box_um = full
    else:
        values = [float(v) for v in region_um]
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"region must be four finite numbers x, y, w, h in um, got {region_um!r}")
        x, y, w, h = values
        if w <= 0 or h <= 0:
            raise ValueError(f"region width and height must be positive, got w={w:g} h={h:g} um")
        box_um = (max(x, 0.0), max(y, 0.0), min(x + w, full[2]), min(y + h, full[3]))
        if box_um[0] >= box_um[2] or box_um[1] >= box_um[3]:
            raise ValueError(
                f"region x={x:g} y={y:g} w={w:g} h={h:g} um lies outside {slide.name} "
                f"({full[2]:.1f} x {full[3]:.1f} um); give it in micrometres from the top-left corner"
            )
    box_px = (
        max(0, math.floor(box_um[0] / mpp_x)),
        max(0, math.floor(box_um[1] / mpp_y)),
        min(width, math.ceil(box_um[2] / mpp_x)),
        min(height, math.ceil(box_um[3] / mpp_y)),
    )
    return box_px, box_um


def _has_tissue(tissue: Any, box_um: tuple[float, float, float, float]) -> bool:
    """Whether any mask pixel touching ``box_um`` is tissue (``tissue`` has ``mask`` and ``mpp``)."""
    mask = np.asarray(tissue.mask, dtype=bool)
    mpp = float(tissue.mpp)
    r0, c0 = max(0, math.floor(box_um[1] / mpp)), max(0, math.floor(box_um[0] / mpp))
    r1, c1 = min(mask.shape[0], math.ceil(box_um[3] / mpp)), min(mask.shape[1], math.ceil(box_um[2] / mpp))
    return r1 > r0 and c1 > c0 and bool(mask[r0:r1, c0:c1].any())


def plan_chunks(
    slide: Any,
    region_um: Sequence[float] | None = None,
    tissue: Any = None,
    chunk_px: int = 1024,
    overlap_um: float = 12.0,
) -> list[Chunk]:
    """The chunks :func:`detect_in_slide` reads, in row-major order.

    Parameters
    ----------
    slide : Slide
        An opened slide with um/px.
    region_um : (x, y, w, h), optional
        Region in micrometres (level-0 frame); None for the whole slide.
    tissue : TissueMask, optional
        Any object with a boolean ``mask`` and its ``mpp``; chunks whose core
        holds no tissue are left out.
    chunk_px : int
        Side of a chunk's core in level-0 pixels.
    overlap_um : float
        Margin read around each core, in micrometres (more than a nucleus diameter).

    Returns
    -------
    list of Chunk

    """
    if int(chunk_px) != chunk_px or chunk_px < 64:
        raise ValueError(f"chunk_px must be an integer >= 64, got {chunk_px!r}")
    if not (math.isfinite(overlap_um) and overlap_um >= 0):
        raise ValueError(f"overlap_um must be >= 0 um, got {overlap_um!r}")
    chunk_px = int(chunk_px)
    mpp_x, mpp_y = slide.require_mpp()
    (x0, y0, x1, y1), _ = region_box_px(slide, region_um)
    width, height = slide.dimensions
    pad_x, pad_y = math.ceil(overlap_um / mpp_x), math.ceil(overlap_um / mpp_y)
    chunks = []
    for row, cy in enumerate(range(y0, y1, chunk_px)):
        for col, cx in enumerate(range(x0, x1, chunk_px)):
            core = (cx, cy, min(cx + chunk_px, x1), min(cy + chunk_px, y1))
            if tissue is not None and not _has_tissue(
                tissue, (core[0] * mpp_x, core[1] * mpp_y, core[2] * mpp_x, core[3] * mpp_y)
            ):
                continue
            read = (
                max(0, core[0] - pad_x), max(0, core[1] - pad_y),
                min(width, core[2] + pad_x), min(height, core[3] + pad_y),
            )  # fmt: skip
            chunks.append(Chunk(core, read, row, col))
    return chunks


def count_chunks(
    slide: Any,
    region_um: Sequence[float] | None = None,
    tissue: Any = None,
    chunk_px: int = 1024,
    overlap_um: float = 12.0,
) -> int:
    """Number of chunks :func:`detect_in_slide` will process (the progress total)."""
    return len(plan_chunks(slide, region_um, tissue, chunk_px, overlap_um))


def resolve_detector(
    detector: str | Callable[[np.ndarray, float], NucleusTable] = DEFAULT_DETECTOR,
    params: NucleusParams | None = None,
) -> Callable[[np.ndarray, float], NucleusTable]:
    """A callable ``(rgb, mpp) -> NucleusTable`` from a registered name (or a callable) and parameters."""
    if callable(detector):
        if params is not None:
            raise ValueError("params apply to the built-in detector only; bind them into your callable")
        return detector
    if detector not in DETECTORS:
        raise ValueError(
            f"unknown nucleus detector {detector!r}; choose one of {', '.join(sorted(DETECTORS))}"
        )
    if params is None:
        return DETECTORS[detector]
    if detector != DEFAULT_DETECTOR:
        raise ValueError(f"NucleusParams apply to {DEFAULT_DETECTOR!r}, not {detector!r}")
    return partial(detect_nuclei, params=params)


def _concat(tables: list[NucleusTable]) -> NucleusTable:
    if not tables:
        return NucleusTable()
    return NucleusTable(**{name: np.concatenate([getattr(t, name) for t in tables]) for name in CSV_COLUMNS})


def _merge_border(
    part: NucleusTable,
    chunk: Chunk,
    edges: dict[tuple[int, int], np.ndarray],
    mpp: tuple[float, float],
    merge_um: float,
) -> NucleusTable:
    """Drop nuclei of ``part`` within ``merge_um`` of one kept by an earlier neighbouring chunk."""
    from scipy.spatial import cKDTree

    xy = part.xy_um()
    cx0, cy0, cx1, cy1 = chunk.core
    inner = (
        (xy[:, 0] >= cx0 * mpp[0] + merge_um) & (xy[:, 0] < cx1 * mpp[0] - merge_um)
        & (xy[:, 1] >= cy0 * mpp[1] + merge_um) & (xy[:, 1] < cy1 * mpp[1] - merge_um)
    )  # fmt: skip
    cells = [(chunk.row + dr, chunk.col + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
    near = [edges[cell] for cell in cells if cell in edges and len(edges[cell])]
    keep = np.ones(len(part), bool)
    edge = np.flatnonzero(~inner)
    if len(edge) and near:
        dist, _ = cKDTree(np.concatenate(near)).query(xy[edge], distance_upper_bound=merge_um)
        keep[edge[dist < merge_um]] = False
    edges[(chunk.row, chunk.col)] = xy[~inner & keep]
    return part if keep.all() else _take(part, keep, part.x_um, part.y_um)


def _take(table: NucleusTable, keep: np.ndarray, x_um: np.ndarray, y_um: np.ndarray) -> NucleusTable:
    columns = {name: getattr(table, name)[keep] for name in CSV_COLUMNS}
    columns.update(x_um=x_um[keep], y_um=y_um[keep])
    return NucleusTable(**columns)


def sample_boxes(
    slide: Any,
    region_um: Sequence[float] | None = None,
    tissue: Any = None,
    n: int = THRESHOLD_SAMPLES,
    side_px: int = THRESHOLD_SAMPLE_PX,
) -> list[tuple[int, int, int, int]]:
    """Boxes ``(x0, y0, x1, y1)`` (level-0 px) to estimate a run's threshold from.

    The region is cut into a ``k x k`` grid (``k = ceil(sqrt(n))``) and a box of at most
    ``side_px`` is centred in each cell; with a tissue mask, boxes without tissue are left out.
    The boxes do not depend on the chunking, so neither does the threshold.
    """
    mpp_x, mpp_y = slide.require_mpp()
    (x0, y0, x1, y1), _ = region_box_px(slide, region_um)
    k = max(1, math.ceil(math.sqrt(n)))
    boxes = []
    for gy in range(k):
        for gx in range(k):
            cx0, cx1 = x0 + (x1 - x0) * gx // k, x0 + (x1 - x0) * (gx + 1) // k
            cy0, cy1 = y0 + (y1 - y0) * gy // k, y0 + (y1 - y0) * (gy + 1) // k
            if cx1 <= cx0 or cy1 <= cy0:
                continue
            w, h = min(side_px, cx1 - cx0), min(side_px, cy1 - cy0)
            bx, by = (cx0 + cx1 - w) // 2, (cy0 + cy1 - h) // 2
            box = (bx, by, bx + w, by + h)
            box_um = (box[0] * mpp_x, box[1] * mpp_y, box[2] * mpp_x, box[3] * mpp_y)
            if tissue is None or _has_tissue(tissue, box_um):
                boxes.append(box)
    return boxes


def estimate_run_threshold(
    slide: Any,
    region_um: Sequence[float] | None = None,
    tissue: Any = None,
    params: NucleusParams | None = None,
) -> float | None:
    """One haematoxylin threshold for a run: :func:`estimate_threshold` over :func:`sample_boxes`.

    Parameters
    ----------
    slide : Slide
        An opened slide with um/px.
    region_um : (x, y, w, h), optional
        The run's region in micrometres; None for the whole slide.
    tissue : TissueMask, optional
        Mask (``.mask``, ``.mpp``); samples are taken where there is tissue.
    params : NucleusParams, optional
        Detector parameters (``sigma_um``, ``threshold_factor``).

    Returns
    -------
    float or None
        The threshold (haematoxylin optical density), or None when no sample holds tissue or
        contrast (chunks then fall back to their own Otsu level).
    """
    mpp_x, mpp_y = slide.require_mpp()
    boxes = sample_boxes(slide, region_um, tissue)
    if not boxes:
        return None
    images = (slide.read_region(0, x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes)
    return estimate_threshold(images, math.sqrt(mpp_x * mpp_y), params)


def detect_in_slide(
    slide: Any,
    region_um: Sequence[float] | None = None,
    tissue: Any = None,
    detector: str | Callable[[np.ndarray, float], NucleusTable] = DEFAULT_DETECTOR,
    params: NucleusParams | None = None,
    chunk_px: int = 1024,
    overlap_um: float = 12.0,
    cancel: threading.Event | None = None,
    merge_um: float = 3.0,
    shared_threshold: bool = True,
) -> Generator[Progress, None, NucleusTable]:
    """Detect nuclei over a slide region at full resolution, chunk by chunk.

    Arguments are checked when this function is called (a slide without um/px,
    a bad region or an unknown detector raise at once); the work happens as the
    returned generator is driven.

    Parameters
    ----------
    slide : Slide
        An opened slide (or plain image opened with ``open_slide(path, mpp=...)``).
    region_um : (x, y, w, h), optional
        Region in micrometres in the level-0 frame; None for the whole slide.
        Only nuclei whose centroid lies inside are returned.
    tissue : TissueMask, optional
        Mask (``.mask``, ``.mpp``) from :mod:`napari_pathology.tissue`; chunks
        without tissue are skipped.
    detector : str or callable
        A name in ``DETECTORS`` or a ``(rgb, mpp) -> NucleusTable`` callable.
    params : NucleusParams, optional
        Parameters of the built-in detector. An absolute ``params.threshold`` is used as is.
    chunk_px : int
        Chunk core side in level-0 pixels.
    overlap_um : float
        Margin read around each chunk (keep it above a nucleus diameter).
    cancel : threading.Event, optional
        Set it to stop before the next chunk; the nuclei found so far are returned.
        Closing the generator stops it too.
    merge_um : float
        Two nuclei from neighbouring chunks closer than this are one nucleus seen
        twice (each chunk segments it a little differently, so the centroid can
        land in either core); the later chunk's copy is dropped. 0 turns this off.
    shared_threshold : bool
        For the built-in detector without an absolute ``params.threshold``: estimate one
        threshold for the run when it starts (:func:`estimate_run_threshold`, reported in
        the first progress message) and use it in every chunk. False thresholds each chunk
        at its own Otsu level.

    Yields
    ------
    Progress
        ``done``/``total`` in chunks; each event after the first carries the
        chunk's nuclei (a :class:`NucleusTable` in slide um) as ``payload``.

    Returns
    -------
    NucleusTable
        Centroids in slide micrometres (level-0 frame), in chunk order.

    Raises
    ------
    SlideOpenError
        When the slide has no um/px (the message says how to set it), or is a
        fluorescence slide given to the built-in (haematoxylin) detector.
    ValueError
        For a bad region, chunk size, overlap or detector.

    Notes
    -----
    With one shared threshold the result hardly depends on the chunking (on the
    synthetic seed-11 slide 256, 1024 and 3072 px chunks agree within about 1%);
    per-chunk Otsu thresholds (``shared_threshold=False``) adapt to stain changes
    across a slide but made those counts differ by up to ~20%. A nucleus on a
    chunk border is counted once: by the chunk whose core holds its centroid, and
    copies within ``merge_um`` found by a neighbouring chunk are dropped.

    """
    mpp_x, mpp_y = slide.require_mpp()
    if detector == DEFAULT_DETECTOR and hasattr(slide, "require_brightfield"):
        slide.require_brightfield()  # the haematoxylin channel exists only in brightfield H&E
    run = resolve_detector(detector, params)
    chunks = plan_chunks(slide, region_um, tissue, chunk_px, overlap_um)
    _, box_um = region_box_px(slide, region_um)
    if not (math.isfinite(merge_um) and merge_um >= 0):
        raise ValueError(f"merge_um must be >= 0 um, got {merge_um!r}")
    estimate = None
    if shared_threshold and detector == DEFAULT_DETECTOR and (params is None or params.threshold is None):
        p = params if params is not None else NucleusParams()
        estimate = partial(estimate_run_threshold, slide, region_um, tissue, p), p
    return _detect_chunks(slide, chunks, run, (mpp_x, mpp_y), box_um, cancel, merge_um, estimate)


def _detect_chunks(
    slide: Any,
    chunks: list[Chunk],
    run: Callable[[np.ndarray, float], NucleusTable],
    mpp: tuple[float, float],
    box_um: tuple[float, float, float, float],
    cancel: threading.Event | None,
    merge_um: float,
    estimate: tuple[Callable[[], float | None], NucleusParams] | None = None,
) -> Generator[Progress, None, NucleusTable]:
    mpp_x, mpp_y = mpp
    note = ""
    if estimate is not None and chunks:
        threshold = estimate[0]()
        if threshold is not None:
            run = partial(detect_nuclei, params=replace(estimate[1], threshold=threshold))
            note = f"; haematoxylin threshold {threshold:.3f} OD for all chunks"
    edges: dict[tuple[int, int], np.ndarray] = {}  # kept nuclei near each finished chunk's core edge
    mpp_det = math.sqrt(mpp_x * mpp_y)
    total = len(chunks)
    found: list[NucleusTable] = []
    n = 0
    yield Progress(0, total, f"{total} chunks at level 0{note}" if total else "no tissue in the region")
    for done, chunk in enumerate(chunks, start=1):
        if cancel is not None and cancel.is_set():
            yield Progress(done - 1, total, f"cancelled: {n} nuclei in {done - 1}/{total} chunks")
            break
        rx0, ry0, rx1, ry1 = chunk.read
        rgb = slide.read_region(0, rx0, ry0, rx1 - rx0, ry1 - ry0)
        table = run(rgb, mpp_det)
        # detector um (chunk frame) -> continuous level-0 px -> slide um
        px = table.x_um / mpp_det + rx0
        py = table.y_um / mpp_det + ry0
        cx0, cy0, cx1, cy1 = chunk.core
        x_um, y_um = px * mpp_x, py * mpp_y
        keep = (px >= cx0) & (px < cx1) & (py >= cy0) & (py < cy1)
        keep &= (x_um >= box_um[0]) & (x_um < box_um[2]) & (y_um >= box_um[1]) & (y_um < box_um[3])
        part = _take(table, keep, x_um, y_um)
        if merge_um > 0:
            part = _merge_border(part, chunk, edges, (mpp_x, mpp_y), merge_um)
        found.append(part)
        n += len(part)
        yield Progress(done, total, f"{n} nuclei in {done}/{total} chunks", part)
    return _concat(found)
