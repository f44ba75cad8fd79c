"""The ``slide`` runner: one network over the whole slide at low magnification, with its activation maps.

For whole-slide CNNs (Chen et al. 2021's and its kind): only the tissue
mask's bounding box (the whole slide without a mask) is read at the spec's
um/px, region by region (:func:`napari_pathology.tissue.read_at_mpp` with a
``box``: an exact area average from the best pyramid level), and run tile by
tile (exact: the tiles' outputs stitch into the full-image ones), so memory
is bounded by the uint8 box plus one tile's activations, never by the
slide's full size or the network's activations over it; the box and the
class maps are checked against the memory budget before anything is read.

A model trained on a fixed input size (``spec.config["fixed_size"]``, side
``spec.input_size`` px) saw each slide's tissue padded with white to that
square, centred: the box is padded the same way (the pad before it a
multiple of the output stride, so CAM cells stay on the slide's cell grid),
the logits come from the whole padded input, and only the CAM cells over
the slide are kept. An axis longer than ``input_size`` is run whole (the
network is fully convolutional; no tissue is dropped) and a provenance
note says so. Each finished tile's cells are yielded as a
:class:`~napari_pathology.analysis.engine.HeatmapBlock` of kind
``activation`` (the positive, or first non-normal, class's map while the
run goes on). The result holds:

- ``heatmap``: the class activation map (CAM) of the predicted class at the
  network's output grid (``cell_um`` = output stride x the input um/px);
  ``class_heatmaps``: every class's CAM;
- ``scores``: class probabilities; ``slide_score`` as
  :func:`~napari_pathology.analysis.bag.slide_score_of` names it;
- ``detections``: the :data:`TOP_K` highest local maxima of the CAM (cell
  centres, scored by the CAM value).

A slide model's network follows this protocol (``WholeSlideNet`` does):

- ``output_shape(height, width) -> (rows, cols)`` and ``output_stride``:
  the CAM grid of an input;
- ``inference_tile(height, width, budget) -> int``: the tile side (px) whose
  prediction fits ``budget`` bytes, ValueError when none does;
- ``predict_tiles(image, tile, *, device, autocast, prepare)``: a generator
  yielding ``(rows, cols, maps)`` (maps ``(1, K, h, w)`` filling those
  output cells) and returning the logits ``(1, K)``; ``image`` is the uint8
  ``(1, 3, H, W)`` slide and ``prepare`` normalises each crop on the device.

No Qt, no napari.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.analysis.bag import slide_score_of
from napari_pathology.analysis.engine import HeatmapBlock, ModelOutputError
from napari_pathology.analysis.folders import check_owner
from napari_pathology.analysis.result import AnalysisResult, ResultMismatchError, load_result, save_result
from napari_pathology.analysis.settings import NoTissueError, RunSettings, run_key, weights_digest
from napari_pathology.devices import resolve_device
from napari_pathology.fileio import ensure_writable_dir
from napari_pathology.progress import Progress

__all__ = ["MEMORY_ENV", "TOP_K", "SlideMemoryError", "memory_budget", "run_slide_analysis"]

#: Highest CAM maxima returned as detections.
TOP_K = 8
#: Environment variable holding the memory budget (GiB) of a slide run; default: see :func:`memory_budget`.
MEMORY_ENV = "NAPARI_PATHOLOGY_SLIDE_MEMORY_GB"
#: Budget when neither the caller nor the environment gives one and free memory cannot be read.
DEFAULT_MEMORY_GB = 4.0


class SlideMemoryError(ValueError):
    """A slide (at the model's um/px) does not fit the memory budget, or the GPU ran out of memory."""


def memory_budget(device: Any, memory_gb: float | None = None) -> int:
    """The bytes a slide run may use: ``memory_gb``, else :data:`MEMORY_ENV`, else measured.

    Measured: the GPU's free memory on CUDA, half the available host memory on a CPU.

    Raises
    ------
    ValueError
        A budget that is not a positive number (naming where it came from).
    """
    source = "memory_gb"
    if memory_gb is None and os.environ.get(MEMORY_ENV):
        source, memory_gb = MEMORY_ENV, os.environ[MEMORY_ENV]
    if memory_gb is not None:
        try:
            value = float(memory_gb)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{source} must be a positive number of GiB, got {memory_gb!r}")
        return int(value * 2**30)
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available // 2)
    except ImportError:  # pragma: no cover - psutil is a dependency of napari
        return int(DEFAULT_MEMORY_GB * 2**30)


def _positive_index(spec: Any) -> int | None:
    return list(spec.classes).index(spec.positive_class) if spec.positive_class in spec.classes else None


def _display_class(spec: Any) -> int:
    """The class whose map is painted while the run goes on: the positive (or first non-normal) one."""
    positive = _positive_index(spec)
    if positive is not None:
        return positive
    lowered = [c.lower() for c in spec.classes]
    return next((k for k, name in enumerate(lowered) if name != "normal"), 0)


def _tissue_box(tissue: Any, mpp: float, shape: tuple[int, int], stride: int) -> tuple[int, int, int, int]:
    """``(r0, r1, c0, c1)`` input px at ``mpp`` holding the mask's tissue, starts snapped to the stride."""
    if tissue is None:
        return 0, shape[0], 0, shape[1]
    if tissue.is_empty:
        raise NoTissueError("the tissue mask is empty: no tissue to run the model on")
    box = tissue.bounding_box(mpp, shape, snap=stride)
    if box is None:
        raise NoTissueError("the tissue mask's tissue lies outside the slide: no tissue to run the model on")
    return box


def _peaks(heatmap: np.ndarray, count: int) -> np.ndarray:
    """``(N, 2)`` row/col of the highest local maxima of a map with NaN outside what was computed."""
    from skimage.feature import peak_local_max

    done = np.isfinite(heatmap)
    if not done.any():
        return np.zeros((0, 2), np.int64)
    filled = np.where(done, heatmap, np.nanmin(heatmap))
    found = peak_local_max(
        filled, min_distance=1, num_peaks=count, exclude_border=False, labels=done.astype(int)
    )
    if len(found) == 0:  # a flat map: its first maximum
        found = np.array([np.unravel_index(np.nanargmax(heatmap), heatmap.shape)])
    return np.asarray(found, np.int64)


def _fixed_padding(
    spec: Any, height: int, width: int, stride: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((pad_top, pad_left), (rows, cols))``: where the box sits in the model's input, and its size.

    A model trained on a fixed size (``spec.config["fixed_size"]``) saw the
    tissue padded with white to ``spec.input_size`` px, centred: an axis
    shorter than that is padded so, the pad before the box rounded to the
    nearest multiple of ``stride`` (CAM cells stay on the slide's grid); a
    longer axis, or any axis of another model, is the box as it is.
    """
    size = int(spec.input_size)
    if not (spec.config or {}).get("fixed_size"):
        return (0, 0), (height, width)
    pads, sides = [], []
    for n in (height, width):
        if n >= size:
            pads.append(0)
            sides.append(n)
            continue
        pad = math.floor((size - n) / 2 / stride + 0.5) * stride  # the nearest (halves: up)
        pads.append(min(pad, (size - n) // stride * stride))
        sides.append(size)
    return (pads[0], pads[1]), (sides[0], sides[1])


def _check_budget(
    slide: Any, mpp: float, box: tuple[int, int], padded: tuple[int, int], maps: int, budget: int
) -> None:
    """SlideMemoryError (one line) when the uint8 input plus ``maps`` bytes of maps exceed ``budget``."""
    need = padded[0] * padded[1] * 3 + maps
    if need <= budget:
        return
    size = f"{box[1]} x {box[0]} px of tissue"
    if padded != box:
        size += f", padded to the model's {padded[1]} x {padded[0]} px input"
    raise SlideMemoryError(
        f"{slide.name} at {mpp:g} um/px ({size}) needs {need / 2**30:.2f} GiB for the image and its class "
        f"maps, more than the {budget / 2**30:.2f} GiB memory budget; raise the budget (memory_gb or "
        f"${MEMORY_ENV}), draw a smaller tissue mask, or use a model trained at a larger um/px"
    )


def run_slide_analysis(
    slide: Any,
    model: Any,
    *,
    tissue: Any = None,
    settings: RunSettings | None = None,
    out_dir: str | Path | None = None,
    cancel: threading.Event | None = None,
    reuse: bool = True,
    on_saved: Callable[[AnalysisResult], None] | None = None,
    memory_gb: float | None = None,
    tile: int | None = None,
) -> Generator[Progress, None, AnalysisResult]:
    """Run a whole-slide model over ``slide``: yields progress, returns the result (see the module).

    Parameters are those of :func:`napari_pathology.analysis.run_analysis`
    (of ``settings`` only ``device`` and ``amp`` apply: one network sees the
    whole slide, so there is no stride, batch, test-time augmentation or
    tissue fraction); ``memory_gb`` is the memory budget (default: :func:`memory_budget`) and
    ``tile`` a tile side in px (a multiple of the output stride; default: the
    largest the budget holds). A cancelled run returns a partial result
    holding the maps of the tiles done (no scores).

    Raises
    ------
    SlideOpenError
        A slide without um/px (the message says how to set it).
    SlideMemoryError
        The tissue box at the model's um/px (padded to the model's fixed
        input size, if it has one) and its class maps do not fit the budget,
        or the GPU ran out of memory even with the smallest tile (one line
        saying what to change).
    NoTissueError
        An empty tissue mask.
    ModelOutputError
        NaN or infinite outputs.
    """
    import torch

    from napari_pathology.tiles import TileGrid
    from napari_pathology.tiles.tensors import normalize_uint8
    from napari_pathology.tissue import read_at_mpp
    from napari_pathology.tissue.mask import _mask_shape

    slide.require_brightfield()
    slide_mpp = slide.require_mpp()
    settings = settings or RunSettings()
    spec = model.spec
    spec_dict = spec.to_dict()
    mpp = float(spec.mpp)
    target = Path(out_dir) if out_dir is not None else None
    if target is not None:
        ensure_writable_dir(target.parent)
        check_owner(target, slide.path)
    device = resolve_device(settings.device)
    net = model.to(device).eval().net
    stride = int(net.output_stride)
    shape = _mask_shape(slide.dimensions, slide_mpp, mpp)
    r0, r1, c0, c1 = _tissue_box(tissue, mpp, shape, stride)
    height, width = r1 - r0, c1 - c0
    (pad_top, pad_left), padded = _fixed_padding(spec, height, width, stride)
    classes = list(spec.classes)
    grid_shape = net.output_shape(*shape)
    # the class maps over the slide's cell grid and the result's copies of them (float32)
    maps_bytes = (2 * len(classes) + 1) * grid_shape[0] * grid_shape[1] * 4
    budget = memory_budget(device, memory_gb)
    _check_budget(slide, mpp, (height, width), padded, maps_bytes, budget)
    if tile is None:
        try:
            tile = int(net.inference_tile(*padded, budget - maps_bytes))
        except ValueError as error:
            raise SlideMemoryError(
                f"{slide.name} at {mpp:g} um/px ({width} x {height} px of tissue) does not fit the memory "
                f"budget: {error}; raise the budget (memory_gb or ${MEMORY_ENV}), draw a smaller tissue "
                "mask, or use a model trained at a larger um/px"
            ) from None
    digest = weights_digest(model)
    key = run_key(slide, spec_dict, digest, settings, tissue)
    out_rows, out_cols = net.output_shape(height, width)  # the cells over the slide
    in_rows, in_cols = net.output_shape(*padded)  # the cells of the model's input
    skip = (pad_top // stride, pad_left // stride)  # input cells before the slide's
    offset = (r0 // stride, c0 // stride)  # slide cell of the box's first cell
    if target is not None and reuse and (target / "result.json").exists():
        try:
            previous = load_result(target)
        except (ResultMismatchError, ValueError):
            previous = None
        if previous is not None and previous.key == key and not previous.partial:
            if on_saved is not None:
                on_saved(previous)
            yield Progress(1, 1, "reloaded saved result", None)
            return previous

    rr, cc = np.meshgrid(np.arange(out_rows) + offset[0], np.arange(out_cols) + offset[1], indexing="ij")
    grid = TileGrid(
        target_mpp=mpp, tile_size=stride, stride=stride, level=0, level_mpp=float(slide_mpp[0]),
        shape=grid_shape, cells=np.stack([rr.ravel(), cc.ravel()], 1).astype(np.int64),
        tissue_fraction=np.ones(rr.size, np.float32), slide_mpp=tuple(slide_mpp), slide_size=slide.dimensions,
    )  # fmt: skip
    started = time.perf_counter()
    yield Progress(0, 1, f"reading {slide.name} at {mpp:g} um/px ({width} x {height} px)", grid)
    canvas = np.full((*padded, 3), 255, np.uint8)  # white around the box when the model pads
    yield from read_at_mpp(
        slide, mpp, box=(r0, r1, c0, c1), max_pixels=None,
        out=canvas[pad_top : pad_top + height, pad_left : pad_left + width],
    )  # fmt: skip
    x = torch.from_numpy(canvas).permute(2, 0, 1).unsqueeze(0)  # uint8 view, no copy

    def prepare(crop: torch.Tensor) -> torch.Tensor:
        return normalize_uint8(crop, spec.normalization)

    def provenance() -> dict[str, Any]:
        notes = []
        if (spec.config or {}).get("fixed_size") and (height > spec.input_size or width > spec.input_size):
            notes.append(
                f"the tissue box ({width} x {height} px) is larger than the model's fixed "
                f"{spec.input_size} px input: run whole (fully convolutional), no tissue dropped"
            )
        info = _provenance(settings, device, digest, tile, (height, width), started)
        info.update(crop_px=[r0, r1, c0, c1], padded_to=list(padded), pad_px=[pad_top, pad_left], notes=notes)
        return info

    cams = np.full((len(classes), *grid_shape), np.nan, np.float32)
    shown = _display_class(spec)
    autocast = torch.bfloat16 if settings.amp and device.type == "cuda" else None
    stop = cancel or threading.Event()
    tiles_total = tiles_done = 0
    while True:  # once, or again with a smaller tile after the GPU ran out of memory
        rows_n, cols_n = (math.ceil(in_rows * stride / tile), math.ceil(in_cols * stride / tile))
        tiles_total, tiles_done = rows_n * cols_n, 0
        steps = net.predict_tiles(x, tile, device=device, autocast=autocast, prepare=prepare)
        try:
            while True:
                if stop.is_set():
                    result = _result(slide, spec_dict, cams, shown, grid, key, (tiles_done, tiles_total))
                    result.provenance = provenance()
                    result.provenance.update(cancelled=True)
                    result.provenance["notes"].append("cancelled")
                    return _finish(result, target, on_saved)
                try:
                    rows, cols, maps = next(steps)
                except StopIteration as done:
                    logits = done.value
                    break
                tiles_done += 1
                # the tile's cells over the slide (none over the padding reach the result)
                kr = range(max(rows.start, skip[0]), min(rows.stop, skip[0] + out_rows))
                kc = range(max(cols.start, skip[1]), min(cols.stop, skip[1] + out_cols))
                if not (kr and kc):
                    yield Progress(tiles_done, tiles_total, f"tile {tiles_done}/{tiles_total} (padding)")
                    continue
                block = maps[0, :, kr.start - rows.start : kr.stop - rows.start,
                             kc.start - cols.start : kc.stop - cols.start].float().numpy()  # fmt: skip
                rs = slice(kr.start - skip[0] + offset[0], kr.stop - skip[0] + offset[0])
                cs = slice(kc.start - skip[1] + offset[1], kc.stop - skip[1] + offset[1])
                cams[:, rs, cs] = block
                cell_r, cell_c = np.meshgrid(
                    np.arange(rs.start, rs.stop), np.arange(cs.start, cs.stop), indexing="ij"
                )
                yield Progress(tiles_done, tiles_total, f"tile {tiles_done}/{tiles_total}", HeatmapBlock(
                    np.stack([cell_r.ravel(), cell_c.ravel()], 1), block[shown].ravel(), kind="activation"
                ))  # fmt: skip
            break
        except torch.OutOfMemoryError:
            steps.close()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if tile <= 2 * stride:
                raise SlideMemoryError(
                    f"{slide.name}: out of memory on {device} even with a {tile} px tile; free the GPU, "
                    "run on the CPU (device cpu) or use a model trained at a larger um/px"
                ) from None
            tile = max(stride, tile // 2 // stride * stride)
            cams[:] = np.nan
            yield Progress(0, 1, f"out of memory on {device}: retrying with {tile} px tiles")
    probabilities = torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
    if not (np.isfinite(probabilities).all() and np.isfinite(cams[np.isfinite(cams)]).all()):
        raise ModelOutputError(f"{spec.name} gave NaN or infinite outputs: its weights are broken")
    predicted = int(np.argmax(probabilities))
    result = _result(slide, spec_dict, cams, predicted, grid, key, (tiles_done, tiles_total))
    peaks = _peaks(result.heatmap, TOP_K)
    y_um = grid.first_centre_um[0] + peaks[:, 0] * grid.cell_um
    x_um = grid.first_centre_um[1] + peaks[:, 1] * grid.cell_um
    result.detections = np.column_stack([x_um, y_um, result.heatmap[peaks[:, 0], peaks[:, 1]]])
    result.slide_score, result.score_name = slide_score_of(classes, probabilities, _positive_index(spec))
    result.scores = {name: float(p) for name, p in zip(classes, probabilities, strict=True)}
    result.partial = False
    result.provenance = provenance()
    result.provenance.update(predicted_class=classes[predicted], cancelled=False)
    yield Progress(tiles_total, tiles_total, f"activation map of class {classes[predicted]}", HeatmapBlock(
        grid.cells, result.heatmap[grid.cells[:, 0], grid.cells[:, 1]], kind="activation"
    ))  # fmt: skip
    return _finish(result, target, on_saved)


def _result(
    slide: Any,
    spec: dict[str, Any],
    cams: np.ndarray,
    shown: int,
    grid: Any,
    key: str,
    tiles: tuple[int, int],
) -> AnalysisResult:
    """A partial result (no scores yet) of the maps computed so far; the caller completes it."""
    return AnalysisResult(
        slide_path=slide.path, slide_name=slide.name, spec=spec, heatmap=cams[shown].copy(),
        class_heatmaps=cams.copy(), cell_um=grid.cell_um, first_centre_um=grid.first_centre_um,
        slide_mpp=slide.require_mpp(), detections=np.zeros((0, 3)), slide_score=float("nan"),
        scores={name: float("nan") for name in spec.get("classes", [])}, partial=True,
        tiles_done=tiles[0], tiles_total=tiles[1], key=key, heatmap_kind="activation", unit="tiles",
        score_name="slide score (whole-slide CNN)",
    )  # fmt: skip


def _provenance(
    settings: RunSettings, device: Any, digest: str, tile: int, size: tuple[int, int], started: float
) -> dict[str, Any]:
    return {
        "settings": asdict(settings), "device": str(device), "weights": digest, "tile_px": tile,
        "input_px": list(size), "seconds": round(time.perf_counter() - started, 3), "notes": [],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip


def _finish(
    result: AnalysisResult, target: Path | None, on_saved: Callable[[AnalysisResult], None] | None
) -> AnalysisResult:
    if target is not None:
        save_result(result, target)
        if on_saved is not None:
            on_saved(result)
    return result
