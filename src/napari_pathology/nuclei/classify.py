"""Nucleus patches and the nucleus purity classifier applied to points (no Qt, no napari).

A nucleus patch is the square of ``context_um`` micrometres centred on a
nucleus centroid, resampled to ``size`` x ``size`` px (Noorbakhsh et al.
2020: 32 x 32) and histogram-equalised. Patches are read block by block: the
points are grouped into blocks of :data:`BLOCK_PX` patch pixels, each block
is read once from the pyramid level closest to (not coarser than) the patch
resolution ``context_um / size``, resampled to that resolution (area
averaging when shrinking, bilinear when enlarging) and the patches are cut
from it, each within half a patch pixel of its centroid. Parts outside the
slide are white, so nuclei at the edge keep their place.

Histogram equalisation is per RGB channel by default: the paper equalises
"to adjust for acquisition differences" between datasets, and equalising
each channel on its own removes differences in stain intensity and colour
cast as well as in brightness. It is scikit-image's ``equalize_hist`` (the
cumulative histogram of the patch's own 256 grey levels, scaled to 0-255)
computed for all patches and channels at once. ``"luminance"`` equalises
the HSV value only (hue and saturation kept); ``"none"`` leaves the pixels.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import Any

import numpy as np

from napari_pathology.progress import Progress
from napari_pathology.tiles.levels import level_for_mpp, reads_directly
from napari_pathology.tiles.read import read_box

__all__ = [
    "BLOCK_PX",
    "NucleusClassifyError",
    "classify_nuclei",
    "equalize_patches",
    "iter_nucleus_patches",
    "nucleus_patches",
    "nucleus_patches_from_image",
    "predicted_purity",
    "spatial_order",
]

#: Side, in patch pixels, of the blocks points are grouped into for reading.
BLOCK_PX = 256
#: Patches equalised at once (bounds the histogram table to ~25 MB).
_EQUALIZE_CHUNK = 4096
_EQUALIZATIONS = ("channel", "luminance", "none")


class NucleusClassifyError(ValueError):
    """Nucleus patches or probabilities cannot be computed; the message says what to change."""


# --------------------------------------------------------------------------- checks


def _check_points(xy_um: Any) -> np.ndarray:
    try:
        xy = np.asarray(xy_um, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise NucleusClassifyError(
            f"nucleus centroids must be an (N, 2) array of x_um, y_um numbers, got {type(xy_um).__name__}"
        ) from error
    if xy.ndim == 1 and xy.size == 0:
        xy = xy.reshape(0, 2)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise NucleusClassifyError(f"nucleus centroids must be an (N, 2) array of x_um, y_um; got {xy.shape}")
    if not np.isfinite(xy).all():
        raise NucleusClassifyError(
            f"{int((~np.isfinite(xy)).any(axis=1).sum())} nucleus centroid(s) are NaN or infinite; drop them"
        )
    return xy


def _check_geometry(context_um: float, size: int) -> tuple[float, int]:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 2:
        raise NucleusClassifyError(f"patch size must be an integer of at least 2 px, got {size!r}")
    try:
        context = float(context_um)
    except (TypeError, ValueError):
        context = math.nan
    if not math.isfinite(context) or context <= 0:
        raise NucleusClassifyError(f"context_um must be a positive number of micrometres, got {context_um!r}")
    return context, int(size)


def _slide_mpp(slide: Any) -> tuple[float, float]:
    try:
        return tuple(float(v) for v in slide.require_mpp())  # type: ignore[return-value]
    except Exception as error:  # SlideOpenError is a RuntimeError; callers expect a ValueError
        raise NucleusClassifyError(str(error)) from error


# --------------------------------------------------------------------------- patches


def _read_block(
    slide: Any, level: int, level_mpp: tuple[float, float], origin: tuple[int, int], shape: tuple[int, int],
    target_mpp: float,
) -> np.ndarray:  # fmt: skip
    """``(h, w, 3)`` RGB at ``target_mpp`` whose pixel (0, 0) is patch-grid pixel ``origin = (x, y)``."""
    (x0, y0), (h, w) = origin, shape
    mx, my = level_mpp
    box = (x0 * target_mpp / mx, y0 * target_mpp / my, w * target_mpp / mx, h * target_mpp / my)
    return read_box(slide, level, box, (w, h), direct=reads_directly(level_mpp, target_mpp))


def spatial_order(xy_um: np.ndarray, block_um: float) -> np.ndarray:
    """Indices sorting points by the ``block_um`` block they fall in (row-major), stable within a block."""
    xy = _check_points(xy_um)
    if len(xy) == 0:
        return np.zeros(0, np.int64)
    cells = np.floor(xy / float(block_um)).astype(np.int64)
    return np.lexsort((cells[:, 0], cells[:, 1])).astype(np.int64)


def _raw_patches(slide: Any, xy: np.ndarray, context_um: float, size: int) -> np.ndarray:
    mpp = _slide_mpp(slide)
    target = context_um / size
    level = level_for_mpp(slide, target, mpp=mpp, enlarge=True)
    ds = float(slide.level_downsamples[level])
    level_mpp = (mpp[0] * ds, mpp[1] * ds)
    out = np.empty((len(xy), size, size, 3), np.uint8)
    if len(xy) == 0:
        return out
    origins = np.round(xy / target - size / 2.0).astype(np.int64)  # patch top-left, patch-grid px
    cells = np.floor_divide(origins, BLOCK_PX)
    order = np.lexsort((cells[:, 0], cells[:, 1]))
    cells = cells[order]
    breaks = np.flatnonzero(np.any(np.diff(cells, axis=0) != 0, axis=1)) + 1
    span = np.arange(size)
    for group in np.split(order, breaks):
        o = origins[group]
        x0, y0 = (int(v) for v in o.min(axis=0))
        x1, y1 = (int(v) + size for v in o.max(axis=0))
        block = _read_block(slide, level, level_mpp, (x0, y0), (y1 - y0, x1 - x0), target)
        rows = (o[:, 1] - y0)[:, None, None] + span[None, :, None]
        cols = (o[:, 0] - x0)[:, None, None] + span[None, None, :]
        out[group] = block[rows, cols]
    return out


def _equalize_rows(values: np.ndarray) -> np.ndarray:
    """Equalise each row of uint8 ``values`` ``(M, P)`` by its own cumulative histogram."""
    m, p = values.shape
    flat = values.astype(np.int64) + (np.arange(m, dtype=np.int64) * 256)[:, None]
    counts = np.bincount(flat.ravel(), minlength=m * 256).reshape(m, 256)
    lut = np.round(np.cumsum(counts, axis=1) * (255.0 / p)).astype(np.uint8)
    return np.take_along_axis(lut, values.astype(np.intp), axis=1)


def equalize_patches(patches: np.ndarray, mode: str = "channel") -> np.ndarray:
    """Histogram-equalise each patch on its own.

    Parameters
    ----------
    patches : ndarray
        ``(N, H, W, 3)`` RGB uint8.
    mode : {"channel", "luminance", "none"}
        ``channel``: every RGB channel of every patch mapped through its own
        cumulative histogram (scikit-image's ``equalize_hist``, scaled to
        0-255); ``luminance``: the HSV value ``max(R, G, B)`` equalised and
        the pixel scaled with it (hue and saturation kept); ``none``: a copy.

    Returns
    -------
    ndarray
        uint8, same shape.

    """
    if mode not in _EQUALIZATIONS:
        raise NucleusClassifyError(f"equalize must be one of {', '.join(_EQUALIZATIONS)}, got {mode!r}")
    patches = np.asarray(patches)
    if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
        raise NucleusClassifyError(f"patches must be (N, H, W, 3) uint8, got {patches.shape} {patches.dtype}")
    out = np.array(patches, copy=True)
    if mode == "none":
        return out
    n, h, w, _ = patches.shape
    for start in range(0, n, _EQUALIZE_CHUNK):
        chunk = patches[start : start + _EQUALIZE_CHUNK]
        k = len(chunk)
        if mode == "channel":
            rows = chunk.transpose(0, 3, 1, 2).reshape(k * 3, h * w)
            out[start : start + k] = _equalize_rows(rows).reshape(k, 3, h, w).transpose(0, 2, 3, 1)
        else:
            value = chunk.max(axis=3).reshape(k, h * w)
            new = _equalize_rows(value).astype(np.float32)
            scale = np.divide(new, value, out=np.zeros_like(new), where=value > 0).reshape(k, h, w, 1)
            out[start : start + k] = np.clip(np.round(chunk * scale), 0, 255).astype(np.uint8)
    return out


def nucleus_patches(
    slide: Any, xy_um: np.ndarray, context_um: float, size: int = 32, *, equalize: str = "channel"
) -> np.ndarray:
    """Histogram-equalised patches centred on nucleus centroids.

    Parameters
    ----------
    slide : Slide
        An opened slide with um/px.
    xy_um : ndarray
        ``(N, 2)`` centroids ``x_um, y_um`` from the slide's top-left corner.
    context_um : float
        Side of the square read around each centroid, um.
    size : int
        Patch side in px (the square is resampled to it).
    equalize : {"channel", "luminance", "none"}
        See :func:`equalize_patches`.

    Returns
    -------
    ndarray
        ``(N, size, size, 3)`` uint8, in the order of ``xy_um``.

    Raises
    ------
    NucleusClassifyError
        For a slide without um/px, malformed points or geometry.

    Examples
    --------
    >>> from napari_pathology.slide import InMemoryBackend, Slide
    >>> slide = Slide(InMemoryBackend([np.full((64, 64, 3), 200, np.uint8)], mpp=0.5))
    >>> nucleus_patches(slide, np.array([[10.0, 10.0], [0.0, 0.0]]), context_um=16.0).shape
    (2, 32, 32, 3)

    """
    context, size = _check_geometry(context_um, size)
    xy = _check_points(xy_um)
    return equalize_patches(_raw_patches(slide, xy, context, size), equalize)


def iter_nucleus_patches(
    slide: Any, xy_um: np.ndarray, context_um: float, size: int = 32, *, equalize: str = "channel",
    chunk: int = 2048,
) -> Generator[Progress, None, np.ndarray]:  # fmt: skip
    """:func:`nucleus_patches` as a progress generator (one event per ``chunk`` nuclei, spatially ordered)."""
    context, size = _check_geometry(context_um, size)
    xy = _check_points(xy_um)
    out = np.empty((len(xy), size, size, 3), np.uint8)
    order = spatial_order(xy, BLOCK_PX * context / size)
    for start in range(0, len(xy), chunk):
        take = order[start : start + chunk]
        out[take] = nucleus_patches(slide, xy[take], context, size, equalize=equalize)
        done = min(start + chunk, len(xy))
        yield Progress(done, len(xy), f"nucleus patches {done}/{len(xy)}")
    return out


def nucleus_patches_from_image(
    rgb: np.ndarray, mpp: float, xy_um: np.ndarray, context_um: float, size: int = 32, *,
    equalize: str = "channel",
) -> np.ndarray:  # fmt: skip
    """:func:`nucleus_patches` for a plain RGB image (a tile) of ``mpp`` um/px; ``xy_um`` from its corner."""
    from napari_pathology.slide import InMemoryBackend, Slide

    image = np.asarray(rgb)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[0] < 1 or image.shape[1] < 1:
        raise NucleusClassifyError(f"the image must be (H, W, 3) RGB, got shape {image.shape}")
    try:
        slide = Slide(InMemoryBackend([image], mpp=mpp))
        slide.require_mpp()
    except (ValueError, TypeError) as error:
        raise NucleusClassifyError(f"the image needs a positive um/px, got {mpp!r}") from error
    return nucleus_patches(slide, xy_um, context_um, size, equalize=equalize)


# --------------------------------------------------------------------------- classification


def require_purity_model(model: Any) -> Any:
    """The spec of ``model``; :class:`NucleusClassifyError` unless its family classifies nuclei.

    A model classifies nuclei when its family's input kind is ``nucleus``
    (:mod:`napari_pathology.families`), e.g. the ``nucleus-purity`` family.
    """
    from napari_pathology.families import family_of, list_families

    spec = getattr(model, "spec", None)
    family = getattr(spec, "family", None)
    try:
        kind = family_of(spec).input_kind if family is not None else None
    except KeyError:
        kind = None
    if kind != "nucleus":
        name = getattr(spec, "name", type(model).__name__)
        known = [f.name for f in list_families() if f.input_kind == "nucleus"]
        raise NucleusClassifyError(
            f"model {name!r} is a {family!r} model; classifying nuclei needs a "
            f"{' or '.join(repr(k) for k in known) or 'nucleus classifier'} model (a family whose input "
            "kind is 'nucleus': one of its registered names, or a checkpoint trained with it)"
        )
    return spec


def classify_nuclei(
    slide: Any,
    xy_um: np.ndarray,
    model: Any,
    *,
    device: str = "cpu",
    batch_size: int = 512,
    tta: bool = False,
) -> Generator[Progress, None, np.ndarray]:
    """Tumour probability of every nucleus, as a progress generator.

    Parameters
    ----------
    slide : Slide
        An opened slide with um/px (or a :class:`~napari_pathology.slide.Slide`
        around an in-memory image).
    xy_um : ndarray
        ``(N, 2)`` centroids ``x_um, y_um``.
    model : PathologyModel
        A ``nucleus-purity`` model (e.g. ``create_model("nucleus-purity")``);
        its spec's config says the context and equalisation.
    device : str
        ``"cpu"``, ``"cuda:N"`` or ``"auto"``.
    batch_size : int
        Nuclei per forward pass (halved on out-of-memory).
    tta : bool
        Average the 8 dihedral orientations.

    Yields
    ------
    Progress
        After every batch (``done`` / ``total`` nuclei). Closing the
        generator stops it after the current batch.

    Returns
    -------
    ndarray
        ``(N,)`` float32 tumour probabilities, in the order of ``xy_um``.

    Raises
    ------
    NucleusClassifyError
        For a model of another family, bad points or a slide without um/px.

    """
    import torch

    from napari_pathology.devices import is_out_of_memory, resolve_device
    from napari_pathology.tiles import to_tensor, tta_mean

    spec = require_purity_model(model)
    xy = _check_points(xy_um)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise NucleusClassifyError(f"batch_size must be a positive integer, got {batch_size!r}")
    context = float(spec.config.get("context_um", spec.mpp * spec.input_size))
    equalize = str(spec.config.get("equalize", "channel"))
    size = spec.input_size
    _slide_mpp(slide)
    dev = resolve_device(device)
    model.to(dev).eval()
    positive = spec.positive_index
    probabilities = np.empty(len(xy), np.float32)
    order = spatial_order(xy, BLOCK_PX * context / size)
    yield Progress(0, len(xy), f"classifying {len(xy)} nuclei with {spec.name}")
    start, batch = 0, int(batch_size)
    while start < len(xy):
        take = order[start : start + batch]
        patches = nucleus_patches(slide, xy[take], context, size, equalize=equalize)
        try:
            with torch.inference_mode():
                x = to_tensor(patches, spec.normalization, device=dev)
                probs = tta_mean(model.predict_proba, x) if tta else model.predict_proba(x)
        except Exception as error:
            if not is_out_of_memory(error) or batch == 1:
                raise
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            batch = max(1, batch // 2)
            yield Progress(start, len(xy), f"out of memory on {dev}: batch size now {batch}")
            continue
        probabilities[take] = probs[:, positive].float().cpu().numpy()
        start += len(take)
        yield Progress(start, len(xy), f"classified {start}/{len(xy)} nuclei")
    return probabilities


def predicted_purity(probabilities: np.ndarray) -> float | None:
    """Predicted purity of a region: the mean tumour probability of its nuclei (None without nuclei).

    Raises
    ------
    NucleusClassifyError
        For values that are not probabilities.

    """
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    if p.size == 0:
        return None
    if not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0:
        raise NucleusClassifyError("tumour probabilities must be finite numbers in [0, 1]")
    return float(p.mean())
