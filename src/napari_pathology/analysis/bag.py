"""The ``bag`` runner: attention MIL over a slide's patch features (CLAM and its kind). No Qt.

Every tissue patch goes through the model's feature encoder (named in its
spec: ``config["encoder"]`` and ``config["encoder_weights"]``, at the spec's
patch size and um/px; ``RunSettings.stride`` below the patch size overlaps
the patches, as CLAM's fine heatmaps do), the features are cached per slide x encoder x grid
(:func:`napari_pathology.features.extract_features`: resumable, so a
cancelled run loses nothing), and the bag goes through the network once.

While features arrive, each batch's raw attention (a patch's score depends
on that patch alone) is yielded as a :class:`~napari_pathology.analysis.engine.HeatmapBlock`
of kind ``attention``, so the viewer paints the attention map as it grows,
at grid resolution (one float per patch, never a full-resolution array).
When the bag is complete the result holds:

- ``heatmap``: raw attention (before the softmax over the bag) of the branch
  of the predicted class (the only branch of a single-branch model);
  ``class_heatmaps``: every branch's raw attention when there are several;
- ``detections``: the :data:`TOP_K` most attended patches' centres, scored by
  their attention weight (softmax over the bag);
- ``scores``: class probabilities; ``slide_score``: the positive class's
  probability, or ``1 - P(normal)`` for models with a ``normal`` class and
  several others.

A bag model's network has ``run(features) -> out`` with ``out.probabilities``
``(1, C)`` and ``out.attention`` ``(K, N)`` raw scores, and
``attention_scores(features) -> (K, N)`` for patches batch by batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.analysis.engine import HeatmapBlock, ModelOutputError
from napari_pathology.analysis.folders import check_owner
from napari_pathology.analysis.result import AnalysisResult, ResultMismatchError, load_result, save_result
from napari_pathology.analysis.settings import (
    NoTissueError,
    RunSettings,
    model_stride,
    run_key,
    weights_digest,
)
from napari_pathology.devices import resolve_device
from napari_pathology.fileio import atomic_write, ensure_writable_dir
from napari_pathology.progress import Progress

__all__ = [
    "ATTENTION_FILE",
    "TOP_K",
    "BagLayout",
    "attention_percentiles",
    "bag_encoder",
    "file_layout",
    "run_bag_analysis",
    "run_on_feature_file",
    "slide_score_of",
    "write_attention_csv",
]

#: Most attended patches returned as detections.
TOP_K = 8
#: Per-patch attention saved beside a bag result (see :func:`write_attention_csv`).
ATTENTION_FILE = "attention.csv"
#: The encoder a bag model's spec names when it names none (CLAM's own).
DEFAULT_ENCODER = "resnet50-trunc"


def bag_encoder(spec: Any, device: Any = "cpu") -> Any:
    """The feature encoder a bag model was trained on, checked against the model's input.

    Raises
    ------
    ValueError
        When the encoder is unknown, its weights cannot be loaded, or its
        features are not the size the model takes (one line naming both).
    """
    from napari_pathology.features import get_encoder

    config = dict(spec.config)
    name = str(config.get("encoder") or DEFAULT_ENCODER)
    encoder = get_encoder(name, weights=config.get("encoder_weights"), device=device)
    expected = config.get("embed_dim")
    if expected is not None and int(encoder.dim) != int(expected):
        raise ValueError(
            f"{spec.name} takes {expected}-d patch features, but its encoder {name!r} gives "
            f"{encoder.dim}-d: the spec names the wrong encoder (or weights of another network)"
        )
    return encoder


def slide_score_of(classes: list[str], probabilities: np.ndarray, positive: int | None) -> tuple[float, str]:
    """The slide score and its name from class probabilities.

    The positive class's probability when the spec names one; ``1 - P(normal)``
    when a ``normal`` class sits among several others; else the top probability.
    """
    lowered = [c.lower() for c in classes]
    if positive is not None and not (len(classes) > 2 and "normal" in lowered):
        return float(probabilities[positive]), f"P({classes[positive]})"
    if "normal" in lowered:
        return 1.0 - float(probabilities[lowered.index("normal")]), "P(not normal)"
    top = int(np.argmax(probabilities))
    return float(probabilities[top]), f"P({classes[top]}), the most likely class"


def _positive_index(spec: Any) -> int | None:
    return list(spec.classes).index(spec.positive_class) if spec.positive_class in spec.classes else None


def _display_branch(spec: Any, branches: int) -> int:
    """The attention branch shown while features arrive: the positive (or first non-normal) class's."""
    if branches == 1:
        return 0
    positive = _positive_index(spec)
    if positive is not None:
        return positive
    lowered = [c.lower() for c in spec.classes]
    return next((k for k, name in enumerate(lowered) if name != "normal"), 0)


def run_bag_analysis(
    slide: Any,
    model: Any,
    *,
    tissue: Any = None,
    settings: RunSettings | None = None,
    out_dir: str | Path | None = None,
    cancel: threading.Event | None = None,
    reuse: bool = True,
    on_saved: Callable[[AnalysisResult], None] | None = None,
    cache_dir: str | Path | None = None,
    features_file: str | Path | None = None,
) -> Generator[Progress, None, AnalysisResult]:
    """Run a bag (attention-MIL) model over ``slide``: yields progress, returns the result.

    With ``features_file`` (a CLAM-layout h5 of this slide, e.g. from CLAM's
    own extractor) its features are used as they are (see
    :func:`run_on_feature_file`); otherwise they are extracted (cached).

    Parameters are those of :func:`napari_pathology.analysis.run_analysis`;
    ``cache_dir`` is where patch features are cached (default: the app's
    cache, ``features/``). A cancelled run returns a partial result holding
    the attention of the patches done (no slide score); their features stay
    cached, so the next run starts where this one stopped.

    Raises
    ------
    NoTissueError
        When no patch has enough tissue.
    ModelOutputError
        When the network gives NaN or infinite outputs.
    ValueError
        When the encoder does not fit the model (see :func:`bag_encoder`).
    """
    import torch

    from napari_pathology.features import FeatureBatch, extract_features, feature_grid

    if features_file is not None:
        return (
            yield from run_on_feature_file(
                slide, model, features_file, settings=settings, out_dir=out_dir, on_saved=on_saved
            )
        )
    slide.require_brightfield()
    slide.require_mpp()
    settings = settings or RunSettings()
    spec = model.spec
    spec_dict = spec.to_dict()
    target = Path(out_dir) if out_dir is not None else None
    if target is not None:
        ensure_writable_dir(target.parent)
        check_owner(target, slide.path)
    device = resolve_device(settings.device)
    encoder = bag_encoder(spec, device)
    min_tissue = settings.min_tissue_fraction if tissue is not None else 0.0
    stride = model_stride(spec, settings)  # below the patch size: overlapping patches (CLAM's fine heatmaps)
    grid = feature_grid(
        slide, encoder, tissue=tissue, min_tissue_fraction=min_tissue, patch_size=spec.input_size,
        mpp=spec.mpp, stride=stride,
    )  # fmt: skip
    if len(grid) == 0:
        raise NoTissueError(
            f"No tissue found in {slide.name}: no {spec.input_size}px patch at {spec.mpp} um/px has "
            f"{settings.min_tissue_fraction:.0%} tissue. Check the tissue mask (Tissue panel) or lower "
            "the minimum tissue fraction."
        )
    digest = f"{weights_digest(model)}+{encoder.digest()}"
    key = run_key(slide, spec_dict, digest, settings, tissue)
    if target is not None and reuse and (target / "result.json").exists():
        try:
            previous = load_result(target)
        except (ResultMismatchError, ValueError):
            previous = None
        if previous is not None and previous.key == key and not previous.partial:
            if on_saved is not None:
                on_saved(previous)
            yield Progress(len(grid), len(grid), "reloaded saved result", None)
            return previous

    net = model.to(device).eval().net
    encoder = encoder.to(device)
    heatmap = np.full(grid.shape, np.nan, np.float32)
    branch = _display_branch(spec, 1 if getattr(net, "model_type", "sb") == "sb" else len(spec.classes))
    started = time.perf_counter()
    notes = (
        [] if encoder.trained else [f"encoder {encoder.name} is UNTRAINED: attention and scores mean nothing"]
    )
    if cache_dir is None:
        from napari_pathology.demo import cache_dir as app_cache

        cache_dir = app_cache() / "features"

    def attention(features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            scores = net.attention_scores(torch.from_numpy(np.ascontiguousarray(features)).to(device)).float()
        scores = scores.cpu().numpy()
        if not np.isfinite(scores).all():
            raise ModelOutputError(f"{spec.name} gave NaN or infinite attention: its weights are broken")
        return scores

    yield Progress(0, len(grid), f"{len(grid)} patches at {spec.mpp} um/px on {device}", grid)
    for note in notes:
        yield Progress(0, len(grid), note)
    stop = cancel or threading.Event()
    try:
        features = yield from _relay(
            extract_features(
                slide, encoder, tissue=tissue, min_tissue_fraction=min_tissue, patch_size=spec.input_size,
                mpp=spec.mpp, stride=stride, cache_dir=cache_dir, batch_size=settings.batch_size,
                workers=settings.workers, stop=stop,
            ),
            lambda batch: _block(batch, attention(batch.features)[branch], heatmap),
            FeatureBatch,
        )  # fmt: skip
    except InterruptedError as stopped:
        result = _partial(slide, spec_dict, grid, heatmap, key, settings, device, started, str(stopped))
        if target is not None:
            save_result(result, target)
            if on_saved is not None:
                on_saved(result)
        return result
    if len(features) != len(grid):  # the grid of the cache is the grid above: a mismatch is a bug
        raise RuntimeError(f"{slide.name}: {len(features)} features for {len(grid)} patches")
    layout = BagLayout(grid.shape, grid.cells, grid.centres_um, features.coords, grid.cell_um,
                       grid.first_centre_um)  # fmt: skip
    context = {"settings": asdict(settings), "device": str(device), "weights": digest,
               "encoder": features.encoder, "notes": notes}  # fmt: skip
    return (
        yield from _finish(
            slide, model, device, features.features, layout, key, context, started, target, on_saved
        )
    )


@dataclass(frozen=True)
class BagLayout:
    """Where a bag's patches sit: the heatmap grid, each patch's cell, centre and level-0 corner."""

    shape: tuple[int, int]
    cells: np.ndarray  # (N, 2) row, col
    centres_um: np.ndarray  # (N, 2) x, y
    coords: np.ndarray  # (N, 2) level-0 top-left x, y px (CLAM's coords)
    cell_um: float
    first_centre_um: tuple[float, float]  # (y, x)


def _finish(
    slide: Any, model: Any, device: Any, features: np.ndarray, layout: BagLayout, key: str,
    context: dict[str, Any], started: float, target: Path | None, on_saved: Any,
) -> Generator[Progress, None, AnalysisResult]:  # fmt: skip
    """Score the whole bag once; the result, saved with ``attention.csv`` when ``target`` is given."""
    import torch

    spec = model.spec
    net = model.net
    with torch.inference_mode():
        out = net.run(torch.from_numpy(np.ascontiguousarray(features, np.float32)).to(device))
    probabilities = out.probabilities[0].float().cpu().numpy()
    raw = out.attention.float().cpu().numpy()  # (K, N)
    if not (np.isfinite(probabilities).all() and np.isfinite(raw).all()):
        raise ModelOutputError(f"{spec.name} gave NaN or infinite outputs: its weights are broken")
    classes = list(spec.classes)
    predicted = int(np.argmax(probabilities))
    shown = predicted if raw.shape[0] > 1 else 0
    rows, cols = layout.cells[:, 0], layout.cells[:, 1]
    heatmap = np.full(layout.shape, np.nan, np.float32)
    heatmap[rows, cols] = raw[shown]
    class_heatmaps = None
    if raw.shape[0] > 1:
        class_heatmaps = np.full((raw.shape[0], *layout.shape), np.nan, np.float32)
        class_heatmaps[:, rows, cols] = raw
    n = len(features)
    yield Progress(n, n, f"attention of class {classes[predicted]}", HeatmapBlock(
        np.stack([rows, cols], 1), raw[shown].astype(np.float32), kind="attention"
    ))  # fmt: skip
    weights = np.exp(raw[shown] - raw[shown].max())
    weights /= weights.sum()
    top = np.argsort(-weights, kind="stable")[:TOP_K]
    detections = np.column_stack([layout.centres_um[top], weights[top]])
    slide_score, score_name = slide_score_of(classes, probabilities, _positive_index(spec))
    result = AnalysisResult(
        slide_path=slide.path, slide_name=slide.name, spec=spec.to_dict(), heatmap=heatmap,
        class_heatmaps=class_heatmaps, cell_um=layout.cell_um, first_centre_um=layout.first_centre_um,
        slide_mpp=slide.require_mpp(), detections=detections, slide_score=slide_score,
        scores={name: float(p) for name, p in zip(classes, probabilities, strict=True)}, partial=False,
        tiles_done=n, tiles_total=n, key=key,
        provenance={
            **context, "predicted_class": classes[predicted],
            "attention_branch": classes[shown] if raw.shape[0] > 1 else None,
            "seconds": round(time.perf_counter() - started, 3), "cancelled": False,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        heatmap_kind="attention", unit="patches", score_name=score_name,
    )  # fmt: skip
    if target is not None:
        save_result(result, target)
        write_attention_csv(target / ATTENTION_FILE, layout, raw[shown])
        if on_saved is not None:
            on_saved(result)
    return result


def attention_percentiles(scores: np.ndarray) -> np.ndarray:
    """Percentiles in (0, 1] of raw attention scores, as CLAM's heatmaps show them (average ranks / N)."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, np.float64)
    return rankdata(scores, method="average") / max(len(scores), 1)


def write_attention_csv(path: Path, layout: BagLayout, scores: np.ndarray) -> Path:
    """Write ``attention.csv``, one row per patch, atomically.

    Columns: ``x,y`` (level-0 top-left, as CLAM's coords), ``x_um,y_um`` (the
    patch centre), ``attention`` (raw, before the softmax, as CLAM's ``A_raw``)
    and ``percentile`` in (0, 1] (:func:`attention_percentiles`).
    """
    import io

    buffer = io.StringIO()
    buffer.write("x,y,x_um,y_um,attention,percentile\n")
    for (x, y), (cx, cy), a, q in zip(
        layout.coords, layout.centres_um, scores, attention_percentiles(scores), strict=True
    ):
        buffer.write(f"{int(x)},{int(y)},{cx:.3f},{cy:.3f},{float(a):.9g},{float(q):.6f}\n")
    return atomic_write(path, buffer.getvalue())


def file_layout(slide: Any, bag: Any) -> BagLayout:
    """The layout of a CLAM feature file's patches on ``slide``: one heatmap cell per patch side.

    The patch side at level 0 is ``patch_size`` at ``patch_level`` (CLAM's
    attributes); without them, the smallest spacing of the coords.
    """
    coords = np.asarray(bag.coords, np.int64).reshape(-1, 2)
    downsamples = list(slide.level_downsamples)
    level = int(bag.patch_level or 0)
    if not 0 <= level < len(downsamples):
        raise ValueError(f"the feature file's patch_level {level} is not a level of {slide.name}")
    if bag.patch_size:
        side = float(bag.patch_size) * float(downsamples[level])
    else:
        steps = np.diff(np.unique(coords[:, 0]))
        side = float(steps[steps > 0].min()) if (steps > 0).any() else 256.0
    mpp_x, mpp_y = slide.require_mpp()
    origin = coords.min(axis=0)
    cells = np.rint((coords - origin) / side).astype(np.int64)[:, ::-1]  # (row, col)
    shape = (int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1)
    centres = np.column_stack([(coords[:, 0] + side / 2) * mpp_x, (coords[:, 1] + side / 2) * mpp_y])
    first = (float((origin[1] + side / 2) * mpp_y), float((origin[0] + side / 2) * mpp_x))
    return BagLayout(shape, cells, centres, coords, float(side * mpp_x), first)


def run_on_feature_file(
    slide: Any,
    model: Any,
    path: str | Path,
    *,
    settings: RunSettings | None = None,
    out_dir: str | Path | None = None,
    on_saved: Callable[[AnalysisResult], None] | None = None,
) -> Generator[Progress, None, AnalysisResult]:
    """Run a bag model on a slide's CLAM-layout feature file as it is; yields progress, returns a result.

    Raises
    ------
    ValueError
        One line naming the file: not CLAM's layout, coords outside the slide,
        features of another size than the model takes, no patches.
    """
    import hashlib

    from napari_pathology.features import read_clam_h5

    settings = settings or RunSettings()
    spec = model.spec
    path = Path(path)
    target = Path(out_dir) if out_dir is not None else None
    if target is not None:
        ensure_writable_dir(target.parent)
        check_owner(target, slide.path)
    bag = read_clam_h5(path, tuple(int(v) for v in slide.dimensions))
    expected = spec.config.get("embed_dim")
    if expected is not None and bag.features.shape[1] != int(expected):
        raise ValueError(
            f"{path.name}: features of dimension {bag.features.shape[1]}, {spec.name} takes {expected} "
            "(features from another encoder?)"
        )
    if len(bag.features) == 0:
        raise NoTissueError(f"{path.name}: the bag holds no patches")
    layout = file_layout(slide, bag)
    device = resolve_device(settings.device)
    model.to(device).eval()
    digest = f"{weights_digest(model)}+{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    yield Progress(0, len(bag.features), f"{len(bag.features)} patches from {path.name} on {device}")
    context = {
        "settings": asdict(settings), "device": str(device), "weights": digest, "features_file": str(path),
        "encoder": dict(bag.attrs).get("encoder"), "notes": [],
    }  # fmt: skip
    key = run_key(slide, spec.to_dict(), digest, settings, None)
    return (
        yield from _finish(
            slide, model, device, bag.features, layout, key, context, time.perf_counter(), target, on_saved
        )
    )


def _relay(
    steps: Generator[Progress, None, Any], paint: Callable[[Any], HeatmapBlock], batch_type: type
) -> Generator[Progress, None, Any]:
    """Pass extraction progress on, replacing each feature batch by its attention block."""
    while True:
        try:
            event = next(steps)
        except StopIteration as finished:
            return finished.value
        if isinstance(event.payload, batch_type):
            event = Progress(event.done, event.total, event.message, paint(event.payload))
        yield event


def _block(batch: Any, values: np.ndarray, heatmap: np.ndarray) -> HeatmapBlock:
    cells = np.asarray(batch.cells)
    heatmap[cells[:, 0], cells[:, 1]] = values
    return HeatmapBlock(cells, values.astype(np.float32), kind="attention")


def _partial(
    slide: Any, spec: dict[str, Any], grid: Any, heatmap: np.ndarray, key: str, settings: RunSettings,
    device: Any, started: float, reason: str,
) -> AnalysisResult:  # fmt: skip
    done = int(np.isfinite(heatmap).sum())
    return AnalysisResult(
        slide_path=slide.path, slide_name=slide.name, spec=spec, heatmap=heatmap.copy(), class_heatmaps=None,
        cell_um=grid.cell_um, first_centre_um=grid.first_centre_um, slide_mpp=slide.require_mpp(),
        detections=np.zeros((0, 3)), slide_score=float("nan"),
        scores={name: float("nan") for name in spec.get("classes", [])}, partial=True, tiles_done=done,
        tiles_total=len(grid), key=key,
        provenance={
            "settings": asdict(settings), "device": str(device), "cancelled": True, "notes": [reason],
            "seconds": round(time.perf_counter() - started, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        heatmap_kind="attention", unit="patches", score_name="slide score (attention)",
    )  # fmt: skip
