"""The inference engine: a model over a slide's tissue tiles, as a progress generator.

``run_analysis`` yields :class:`~napari_pathology.progress.Progress` events
whose ``payload`` is the :class:`HeatmapBlock` just finished, and returns an
:class:`~napari_pathology.analysis.result.AnalysisResult`. The GUI runs it in
a worker and paints blocks as they arrive; the CLI drives it with a progress
bar. Cancelling (the ``cancel`` event, closing the generator, Ctrl-C or the
CLI's SIGTERM inside the run) keeps what was finished, marked partial, and a
later run with the same settings resumes from it. While a run goes on its
partial result is saved atomically every :data:`PARTIAL_SAVE_SECONDS`, so a
kill -9 loses at most one interval.

Before any work the settings (:class:`RunSettings`) and the slide
(:func:`check_run`, both in :mod:`napari_pathology.analysis.settings`) are
checked and the result folder (:mod:`napari_pathology.analysis.folders`) is
proved writable;
NaN model outputs are an error (:class:`ModelOutputError`), never a cell
"not done yet".
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.analysis.folders import check_owner, path_tag, result_folder
from napari_pathology.analysis.nms import non_maximum_suppression
from napari_pathology.analysis.result import (
    HEATMAP_KINDS,
    AnalysisResult,
    ResultMismatchError,
    load_result,
    save_result,
)
from napari_pathology.analysis.settings import (
    NoTissueError,
    RunSettings,
    RunSettingsError,
    check_run,
    model_stride,
    run_key,
    weights_digest,
)
from napari_pathology.devices import is_out_of_memory, resolve_device
from napari_pathology.fileio import ensure_writable_dir
from napari_pathology.progress import Progress
from napari_pathology.slide import Slide

__all__ = [  # the settings, checks and folders live in their own modules; importable from here too
    "PARTIAL_SAVE_SECONDS",
    "TILE_AGGREGATORS",
    "HeatmapBlock",
    "ModelOutputError",
    "NoTissueError",
    "RunSettings",
    "RunSettingsError",
    "aggregate",
    "check_run",
    "path_tag",
    "result_folder",
    "run_analysis",
    "run_key",
    "weights_digest",
]

#: The spec aggregators (:data:`napari_pathology.models.AGGREGATORS`) computed from tile probabilities
#: here; the others (``attention``) are a model's own slide-level head.
TILE_AGGREGATORS = ("max", "mean", "fraction")

#: Seconds between saves of a partial result while a run goes on (a kill loses at most this much).
PARTIAL_SAVE_SECONDS = 30.0


class ModelOutputError(ValueError):
    """A model produced NaN or infinite probabilities: its weights (or precision) are broken."""


@dataclass(frozen=True)
class HeatmapBlock:
    """Cells finished in one batch: ``cells`` (B, 2) row/col, their ``values`` (B,) and what they are.

    ``kind`` names a :data:`~napari_pathology.analysis.result.HEATMAP_KINDS` entry (a runner of
    attention scores yields blocks of kind ``attention``), so a viewer paints them as the result
    will show them.
    """

    cells: np.ndarray
    values: np.ndarray
    kind: str = "probability"

    def __post_init__(self) -> None:
        """Refuse a kind the viewer cannot show (one line naming the known ones)."""
        if self.kind not in HEATMAP_KINDS:
            raise ValueError(f"unknown heatmap kind {self.kind!r} (known: {', '.join(HEATMAP_KINDS)})")


def aggregate(
    heatmap: np.ndarray, class_heatmaps: np.ndarray, aggregator: str, classes: list[str]
) -> tuple[float, dict[str, float]]:
    """Slide score and per-class scores from the finished cells.

    ``max`` and ``mean`` aggregate each class's probability map; ``fraction``
    is, per class, the share of tissue tiles whose most likely class it is
    (Noorbakhsh's tumour-predicted fraction for the positive class).
    """
    done = ~np.isnan(heatmap)
    if not done.any():
        return float("nan"), {name: float("nan") for name in classes}
    values = class_heatmaps[:, done]  # (classes, tiles)
    if aggregator == "max":
        per_class = values.max(axis=1)
        slide_score = float(heatmap[done].max())
    elif aggregator == "mean":
        per_class = values.mean(axis=1)
        slide_score = float(heatmap[done].mean())
    elif aggregator == "fraction":
        winners = values.argmax(axis=0)
        per_class = np.array([(winners == k).mean() for k in range(len(classes))])
        slide_score = float("nan")
    else:
        raise ValueError(
            f"aggregator {aggregator!r} is not computed from tile probabilities; "
            f"models using it provide their own slide-level head (known here: {', '.join(TILE_AGGREGATORS)})"
        )
    scores = {name: float(v) for name, v in zip(classes, per_class, strict=True)}
    return slide_score, scores


def run_analysis(
    slide: Slide,
    model: Any,
    *,
    tissue: Any = None,
    settings: RunSettings | None = None,
    out_dir: str | Path | None = None,
    cancel: threading.Event | None = None,
    reuse: bool = True,
    on_saved: Callable[[AnalysisResult], None] | None = None,
) -> Generator[Progress, None, AnalysisResult]:
    """Run ``model`` over the tissue tiles of ``slide``.

    Parameters
    ----------
    slide : Slide
        An opened slide with um/px (file or user override).
    model : PathologyModel
        A model from the registry or a checkpoint (carries its ``spec``).
    tissue : TissueMask, optional
        Mask with ``.mask`` and ``.mpp``; tiles without enough tissue are skipped.
    settings : RunSettings, optional
        Stride, batch size, device, TTA, NMS, partial-save interval.
    out_dir : path, optional
        Result folder (see :func:`result_folder`): checked writable before
        work, saved there (partial results every ``settings.save_every_s``
        seconds, default :data:`PARTIAL_SAVE_SECONDS`, and when cancelled,
        closed or interrupted), and reloaded (or resumed when partial) when
        slide, model and settings are unchanged and the saved arrays verify.
    cancel : threading.Event, optional
        Set it to stop after the current batch; the result is then partial.
    reuse : bool
        Reload a matching result instead of recomputing.
    on_saved : callable, optional
        Called with the result each time one for this run is on disk
        (reloaded, resumed from, or saved).

    Yields
    ------
    Progress
        The first event's ``payload`` is the :class:`~napari_pathology.tiles.TileGrid`
        (so a viewer can lay out the heatmap at once); when resuming, the next
        one carries the cells already done as a :class:`HeatmapBlock`; later
        ones carry the :class:`HeatmapBlock` just finished.

    Returns
    -------
    AnalysisResult

    Raises
    ------
    ModelOutputError
        When the model produces NaN or infinite outputs (nothing is saved for them).
    NoTissueError
        When no tile has enough tissue (after the checks of :func:`check_run`).
    OutputError
        When the result folder cannot be written (one line naming it).
    """
    slide.require_brightfield()  # a fluorescence slide: the H&E models do not apply (NotBrightfieldError)
    import torch

    from napari_pathology.tiles import TileLoader, make_tile_grid, tta_mean

    settings = settings or RunSettings()
    spec = model.spec
    if spec.output == "nuclei":
        raise ValueError(
            f"{spec.name} classifies nuclei, not tiles: run it with napari_pathology.analysis.run "
            "(what Run and the CLI do)"
        )
    spec_dict = spec.to_dict()
    slide.require_mpp()
    check_run(slide, spec, settings)
    target = Path(out_dir) if out_dir is not None else None
    if target is not None:
        ensure_writable_dir(target.parent)
        check_owner(target, slide.path)
    stride = model_stride(spec, settings)
    grid = make_tile_grid(
        slide, spec.mpp, spec.input_size, stride, tissue=tissue,
        min_tissue_fraction=settings.min_tissue_fraction if tissue is not None else 0.0,
        tissue_region_size=stride,
    )  # fmt: skip
    if len(grid) == 0:
        raise NoTissueError(
            f"No tissue found in {slide.name}: no {spec.input_size}px tile at {spec.mpp} um/px has "
            f"{settings.min_tissue_fraction:.0%} tissue. Check the tissue mask (Tissue panel) or lower "
            "the minimum tissue fraction."
        )
    classes = list(spec.classes)
    positive = spec.positive_index
    digest = weights_digest(model)
    key = run_key(slide, spec_dict, digest, settings, tissue)
    heatmap = np.full(grid.shape, np.nan, np.float32)
    class_heatmaps = np.full((len(classes), *grid.shape), np.nan, np.float32)
    notes: list[str] = []
    saved_done = 0  # tiles of this run known to be on disk

    if target is not None and reuse and (target / "result.json").exists():
        try:
            previous = load_result(target)
        except ResultMismatchError as error:
            notes.append(str(error))
            previous = None
        except ValueError:
            previous = None
        if previous is not None and previous.key == key and previous.heatmap.shape == grid.shape:
            if not previous.partial:
                if on_saved is not None:
                    on_saved(previous)
                yield Progress(len(grid), len(grid), "reloaded saved result", None)
                return previous
            heatmap[:] = previous.heatmap
            if previous.class_heatmaps is not None and previous.class_heatmaps.shape == class_heatmaps.shape:
                class_heatmaps[:] = previous.class_heatmaps
            saved_done = previous.tiles_done
            if on_saved is not None:
                on_saved(previous)

    rows, cols = grid.cells[:, 0], grid.cells[:, 1]
    todo = np.flatnonzero(np.isnan(heatmap[rows, cols]))
    total = len(grid)
    done = total - len(todo)
    saved_done = min(saved_done, done)
    use_tta = spec.tta if settings.tta is None else settings.tta
    device = resolve_device(settings.device)
    model = model.to(device).eval()
    autocast = settings.amp and device.type == "cuda"
    chunk = max(1, settings.batch_size)
    started = time.perf_counter()
    save_every = PARTIAL_SAVE_SECONDS if settings.save_every_s is None else float(settings.save_every_s)
    last_save = time.monotonic()
    cancelled = False

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, enabled=autocast):
            if use_tta:
                return tta_mean(model.predict_proba, x).float()
            return model.predict_proba(x).float()

    def finish() -> AnalysisResult:
        partial = bool(np.isnan(heatmap[rows, cols]).any())
        detections = _detections(heatmap, grid, settings)
        slide_score, scores = aggregate(heatmap, class_heatmaps, spec.aggregator, classes)
        if spec.aggregator == "fraction":
            slide_score = scores[classes[positive]]
        result = AnalysisResult(
            slide_path=slide.path, slide_name=slide.name, spec=spec_dict, heatmap=heatmap.copy(),
            class_heatmaps=class_heatmaps.copy(), cell_um=grid.cell_um,
            first_centre_um=grid.first_centre_um, slide_mpp=slide.require_mpp(),
            detections=detections, slide_score=slide_score, scores=scores, partial=partial,
            tiles_done=int((~np.isnan(heatmap[rows, cols])).sum()), tiles_total=total, key=key,
            provenance={
                "settings": asdict(settings), "device": str(device), "tta": use_tta,
                "seconds": round(time.perf_counter() - started, 3), "notes": list(notes),
                "cancelled": cancelled, "weights": digest,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )  # fmt: skip
        if target is not None:
            save_result(result, target)
            if on_saved is not None:
                on_saved(result)
        return result

    yield Progress(done, total, f"{total} tiles at {spec.mpp} um/px on {device}", grid)
    if done:
        kept = grid.cells[~np.isnan(heatmap[rows, cols])]
        yield Progress(
            done, total, f"resuming: {done}/{total} tiles kept from the saved partial result",
            HeatmapBlock(kept, heatmap[kept[:, 0], kept[:, 1]].copy()),
        )  # fmt: skip
    # the first results show within a couple of seconds: batches of 4, 8, 16... up to batch_size
    ramp = first_batches(len(todo), settings.batch_size)
    bounds = np.cumsum([0, *ramp])
    loaders = [
        TileLoader(slide, grid, size, indices=todo[start : start + size], workers=settings.workers)
        for start, size in zip(bounds[:-1], ramp, strict=True)
    ] + [TileLoader(slide, grid, settings.batch_size, indices=todo[bounds[-1] :], workers=settings.workers)]
    loader = _Loaders(loaders)
    try:
        for indices, tiles in loader:
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
            x = _to_batch(tiles, spec.normalization)
            probs, chunk = _predict_cancellable(predict, x, device, chunk, notes, cancel)
            probs = probs.cpu().numpy()
            indices = indices[: len(probs)]  # cancelled within the batch: the tiles finished
            _require_finite_outputs(probs, spec.name, autocast)
            r, c = rows[indices], cols[indices]
            class_heatmaps[:, r, c] = probs.T
            heatmap[r, c] = probs[:, positive]
            done += len(indices)
            elapsed = time.perf_counter() - started
            rate = (done - (total - len(todo))) / max(elapsed, 1e-9)
            eta = (total - done) / rate if rate > 0 else float("inf")
            message = f"{done}/{total} tiles, {rate:.1f} tiles/s, ETA {_format_eta(eta)}"
            if target is not None and done < total and time.monotonic() - last_save >= save_every:
                finish()  # bounded loss: a kill from here on loses at most one interval
                saved_done, last_save = done, time.monotonic()
            yield Progress(done, total, message, HeatmapBlock(np.stack([r, c], 1), heatmap[r, c].copy()))
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
    except (GeneratorExit, KeyboardInterrupt):  # consumer gone, Ctrl-C or SIGTERM: keep what is finished
        cancelled = True
        loader.close()
        if target is not None and done > saved_done:
            finish()
        raise
    finally:
        loader.close()
    return finish()


#: Tiles in a run's first batch; the next batches double up to the run's batch size.
FIRST_BATCH = 4


def first_batches(todo: int, batch_size: int, first: int = FIRST_BATCH) -> list[int]:
    """Sizes of a run's ramp of small first batches (4, 8, 16... below ``batch_size``, within ``todo``)."""
    sizes: list[int] = []
    size = first
    while size < batch_size and sum(sizes) < todo:
        sizes.append(min(size, todo - sum(sizes)))
        size *= 2
    return sizes


#: On the CPU a batch is predicted this many tiles at a time, Cancel checked in between (~1 s).
CANCEL_STEP_CPU = 4


def _predict_cancellable(
    predict: Callable[[Any], Any], x: Any, device: Any, chunk: int, notes: list[str], cancel: Any
) -> tuple[Any, int]:
    """Predict a batch, on the CPU :data:`CANCEL_STEP_CPU` tiles at a time so that Cancel stops it.

    Between two steps a set ``cancel`` ends the batch early (at least one step is done);
    elsewhere the batch goes whole. Returns the finished tiles' outputs and the chunk size.
    """
    import torch

    step = CANCEL_STEP_CPU if device.type == "cpu" and cancel is not None else len(x)
    parts = []
    for start in range(0, len(x), step):
        if parts and cancel.is_set():
            break
        part, chunk = _predict_with_retry(predict, x[start : start + step], device, chunk, notes)
        parts.append(part)
    return torch.cat(parts), chunk


class _Loaders:
    """Several tile loaders read one after the other, closed together."""

    def __init__(self, loaders: list[Any]) -> None:
        self.loaders = loaders

    def __iter__(self) -> Any:
        return itertools.chain.from_iterable(self.loaders)

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()


def _require_finite_outputs(probs: np.ndarray, model_name: str, autocast: bool) -> None:
    """Refuse NaN or infinite model outputs: never a 'not done yet' cell, never saved."""
    bad = ~np.isfinite(probs)
    if not bad.any():
        return
    tiles = int(bad.any(axis=1).sum()) if bad.ndim == 2 else int(bad.sum())
    kind = "NaN" if np.isnan(probs).any() else "infinite"
    precision = " (or mixed precision overflowed on the GPU: try without AMP)" if autocast else ""
    raise ModelOutputError(
        f"model {model_name} produced {kind} outputs for {tiles} of {len(probs)} tiles; its weights "
        f"are probably broken{precision}. Retrain it or use another checkpoint; nothing was saved "
        "for these tiles."
    )


def _to_batch(tiles: np.ndarray, normalization: str):
    from napari_pathology.tiles import to_tensor

    return to_tensor(tiles, normalization)


def _predict_with_retry(
    predict: Callable[[Any], Any], x: Any, device: Any, chunk: int, notes: list[str]
) -> tuple[Any, int]:
    """Predict in chunks of ``chunk`` tiles, halving the chunk on out-of-memory."""
    import torch

    while True:
        try:
            parts = [predict(x[i : i + chunk].to(device, non_blocking=True)) for i in range(0, len(x), chunk)]
            return torch.cat(parts), chunk
        except Exception as error:
            if not is_out_of_memory(error) or chunk == 1:
                if is_out_of_memory(error):
                    raise MemoryError(
                        f"out of memory on {device} even with one tile per batch; use a smaller model, "
                        "another device, or the CPU"
                    ) from error
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            chunk = max(1, chunk // 2)
            notes.append(f"out of memory on {device}: retrying with batch size {chunk}")


def _detections(heatmap: np.ndarray, grid: Any, settings: RunSettings) -> np.ndarray:
    found = non_maximum_suppression(heatmap, settings.nms_threshold, settings.nms_radius)
    y0, x0 = grid.first_centre_um
    x_um = x0 + found[:, 1] * grid.cell_um
    y_um = y0 + found[:, 0] * grid.cell_um
    return np.stack([x_um, y_um, found[:, 2]], axis=1) if len(found) else np.zeros((0, 3))


def _format_eta(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
