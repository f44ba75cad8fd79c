"""Turn slides into napari layer data and back, without importing napari.

A slide layer is an RGB multiscale image layer whose ``scale`` is in
micrometres and whose ``metadata`` carries the slide's facts under plain keys
(``path``, ``backend``, ``vendor``, ``width``, ``height``, ``level_dimensions``,
``level_downsamples``, ``mpp_x``, ``mpp_y``, ``mpp_missing``,
``objective_power``...) plus the marker key :data:`SLIDE_MARKER`. Later steps
(tissue, analysis, annotation) find the slide again with
:func:`slide_from_metadata`, so a um/px set by the user is used everywhere.

Layers derived from a slide (heatmaps, detections, tissue, nuclei, regions) carry
:func:`link_metadata`; :func:`follow_slide_scale` is the one place that moves them
when the slide's um/px changes. A um/px the user sets is remembered per slide in
``<slide file>.napari-pathology.json`` (:func:`remember_mpp`, :func:`remembered_mpp`)
and applied again when the slide is reopened.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.slide import Slide, SlideReadError, open_slide
from napari_pathology.world import world_from_um

#: Key present in the metadata of every slide layer made by this plugin.
SLIDE_MARKER = "napari_pathology_slide"

LayerData = tuple[Any, dict[str, Any], str]

_OPEN_SLIDES: OrderedDict[str, Slide] = OrderedDict()
_OPEN_SLIDES_LOCK = threading.Lock()
_MAX_OPEN_SLIDES = 16


def slide_metadata(slide: Slide) -> dict[str, Any]:
    """The metadata dictionary stored on a slide layer."""
    info = slide.info()
    meta = info.as_dict()
    meta["mpp_missing"] = info.mpp_x is None
    meta[SLIDE_MARKER] = True
    return meta


def slide_scale(slide: Slide) -> tuple[float, float]:
    """Layer ``scale`` (y, x): micrometres per pixel, or 1 when unknown."""
    mpp = slide.mpp
    return (mpp[1], mpp[0]) if mpp else (1.0, 1.0)


def slide_units(slide: Slide) -> tuple[str, str]:
    """Layer ``units`` for napari's scale bar: micrometres, or pixels when unknown."""
    return ("micrometer", "micrometer") if slide.mpp else ("pixel", "pixel")


def slide_layer_data(
    slide: Slide,
    name: str | None = None,
    on_error: Callable[[SlideReadError], None] | None = None,
) -> LayerData:
    """Layer data tuple ``(pyramid, kwargs, "image")`` for a slide.

    Parameters
    ----------
    slide : Slide
        The opened slide.
    name : str, optional
        Layer name; the file stem by default.
    on_error : callable, optional
        Called with a :class:`SlideReadError` when a tile cannot be decoded
        while napari draws; the tile is then shown grey.

    """
    remember_slide(slide)
    kwargs = {
        "name": name or Path(slide.name).stem,
        "rgb": True,
        "multiscale": True,
        "scale": slide_scale(slide),
        "units": slide_units(slide),
        "contrast_limits": (0, 255),
        "metadata": slide_metadata(slide),
    }
    return slide.pyramid(on_error=on_error), kwargs, "image"


def is_slide_metadata(metadata: Mapping[str, Any]) -> bool:
    """Whether a layer's metadata describes a slide opened by this plugin."""
    return bool(metadata.get(SLIDE_MARKER))


def remember_slide(slide: Slide) -> None:
    """Keep an opened slide so :func:`slide_from_metadata` can reuse it."""
    if not slide.path:
        return
    with _OPEN_SLIDES_LOCK:
        _OPEN_SLIDES[str(Path(slide.path).resolve())] = slide
        _OPEN_SLIDES.move_to_end(str(Path(slide.path).resolve()))
        while len(_OPEN_SLIDES) > _MAX_OPEN_SLIDES:
            _OPEN_SLIDES.popitem(last=False)


def slide_from_metadata(metadata: Mapping[str, Any]) -> Slide:
    """The :class:`Slide` behind a slide layer, with the layer's um/px.

    Reuses an already opened slide when possible; re-opens the file otherwise.

    Raises
    ------
    ValueError
        When the metadata is not a slide layer's.
    SlideOpenError
        When the file can no longer be opened.

    """
    if not is_slide_metadata(metadata) or not metadata.get("path"):
        raise ValueError("this layer is not a slide opened by napari-pathology")
    key = str(Path(metadata["path"]).resolve())
    with _OPEN_SLIDES_LOCK:
        slide = _OPEN_SLIDES.get(key)
    if slide is None:
        slide = open_slide(key)
        remember_slide(slide)
    if metadata.get("mpp_source") == "user" and metadata.get("mpp_x"):
        slide.set_mpp(float(metadata["mpp_x"]))
    return slide


def apply_mpp(metadata: dict[str, Any], slide: Slide, mpp: float | None) -> tuple[float, float]:
    """Set (or clear) a user um/px on a slide and update layer metadata in place.

    Returns
    -------
    tuple of float
        The new layer ``scale`` (y, x).

    """
    slide.set_mpp(mpp)
    metadata.update(slide_metadata(slide))
    return slide_scale(slide)


def overlay_geometry(
    cell_um: float | tuple[float, float],
    first_centre_um: tuple[float, float],
    slide_mpp: tuple[float, float] | None,
) -> dict[str, tuple[float, float]]:
    """``scale`` and ``translate`` that lay a grid (mask, heatmap) exactly over a slide layer.

    napari draws data pixel ``i`` centred at ``translate + i * scale``; a slide
    layer has no translate, so its level-0 pixel ``i`` (covering physical
    ``[i, i + 1) * mpp``) is drawn centred at ``i * mpp``, half a pixel before
    its physical centre. Grids are described physically and shifted the same way
    (:func:`napari_pathology.world.world_from_um`, the one home of that shift).

    Parameters
    ----------
    cell_um : float or (float, float)
        Size of one grid cell in micrometres, ``(y, x)`` or square.
    first_centre_um : (float, float)
        Physical ``(y, x)`` centre of cell ``(0, 0)`` in micrometres from the
        slide's top-left corner.
    slide_mpp : (float, float) or None
        The slide's level-0 ``(mpp_x, mpp_y)``; None when the slide is shown in pixels
        (then ``cell_um`` and ``first_centre_um`` must be in level-0 pixels).

    Returns
    -------
    dict
        ``{"scale": (sy, sx), "translate": (ty, tx)}`` for ``viewer.add_image`` / ``add_labels``.
    """
    sy, sx = (cell_um, cell_um) if isinstance(cell_um, int | float) else cell_um
    ((ty, tx),) = world_from_um((first_centre_um[1], first_centre_um[0]), slide_mpp or None)
    return {"scale": (float(sy), float(sx)), "translate": (float(ty), float(tx))}


# --------------------------------------------------------------------------- derived layers

#: Metadata key linking a layer derived from a slide (heatmap, detections, tissue, nuclei,
#: regions) to it: the slide's file path.
SOURCE_KEY = "napari_pathology_source"
#: Metadata key: the slide layer's ``scale`` ``(y, x)`` the derived layer was laid out for.
#: Derived layers are physical (micrometre) geometry tied to the slide's level-0 pixels, so
#: when the slide's um/px changes, their world geometry scales by ``new / placed``.
PLACED_SCALE_KEY = "napari_pathology_placed_scale"


def link_metadata(slide_metadata: Mapping[str, Any], scale: Any = None) -> dict[str, Any]:
    """Metadata entries that tie a derived layer to its slide so it follows the slide's um/px.

    Parameters
    ----------
    slide_metadata : mapping
        The slide layer's metadata (its ``path`` names the slide).
    scale : (float, float), optional
        The slide layer's ``scale`` ``(y, x)`` the derived layer's geometry was computed
        with; by default the slide's current um/px (1 when it has none).

    Returns
    -------
    dict
        ``{SOURCE_KEY: path, PLACED_SCALE_KEY: [sy, sx]}``, to merge into the layer's metadata.
    """
    if scale is None:
        mpp_x, mpp_y = slide_metadata.get("mpp_x"), slide_metadata.get("mpp_y")
        scale = (float(mpp_y), float(mpp_x)) if mpp_x and mpp_y else (1.0, 1.0)
    sy, sx = (float(v) for v in list(scale)[-2:])
    return {SOURCE_KEY: slide_metadata.get("path"), PLACED_SCALE_KEY: [sy, sx]}


def _same_file(a: Any, b: Any) -> bool:
    if not isinstance(a, str | Path) or not isinstance(b, str | Path) or not str(a) or not str(b):
        return False
    if str(a) == str(b):
        return True
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError):
        return False


def is_derived_from(metadata: Mapping[str, Any], slide_path: str | None) -> bool:
    """Whether a layer's metadata ties it to the slide at ``slide_path``.

    Any top-level metadata value naming the slide file counts: :data:`SOURCE_KEY`, and the
    keys other creators use (the tissue layer's ``slide_path``, the nuclei and prediction
    markers). Slide layers themselves never count.
    """
    if not slide_path or not isinstance(metadata, Mapping) or is_slide_metadata(metadata):
        return False
    source = metadata.get(SOURCE_KEY)
    if source is not None:
        return _same_file(source, slide_path)
    return any(_same_file(value, slide_path) for value in metadata.values())


def placed_scale(metadata: Mapping[str, Any]) -> tuple[float, float] | None:
    """The slide scale ``(y, x)`` a derived layer was laid out for, when its metadata says."""
    placed = metadata.get(PLACED_SCALE_KEY)
    if placed is None and metadata.get("slide_mpp") is not None:  # tissue layers: (mpp_x, mpp_y)
        placed = list(metadata["slide_mpp"])[::-1]
    try:
        sy, sx = (float(v) for v in placed)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return (sy, sx) if sy > 0 and sx > 0 else None


def _layer_kind(layer: Any) -> str:
    return str(getattr(layer, "_type_string", type(layer).__name__)).lower()


def _times(values: Any, factors: np.ndarray) -> np.ndarray:
    out = np.array(values, dtype=np.float64, copy=True)
    out[..., -2:] = out[..., -2:] * factors
    return out


def rescale_layer(layer: Any, factor_y: float, factor_x: float) -> None:
    """Multiply a layer's world geometry by ``(factor_y, factor_x)`` about the origin.

    Image and labels layers change ``scale`` and ``translate``; points and shapes keep
    their ``scale`` and have their data (world micrometres in this plugin), ``translate``
    and marker sizes / edge widths multiplied, so code reading their data as world
    coordinates stays right. A points feature ``area_um2`` scales by the area factor.
    """
    factors = np.array([factor_y, factor_x], dtype=np.float64)
    linear = float(np.sqrt(factor_y * factor_x))
    kind = _layer_kind(layer)
    layer.translate = _times(layer.translate, factors)
    if kind == "points":
        if len(layer.data):
            size = np.asarray(layer.size, dtype=np.float64) * linear
            layer.data = _times(layer.data, factors)
            layer.size = size
        features = getattr(layer, "features", None)
        if features is not None and "area_um2" in features and len(features):
            features["area_um2"] = np.asarray(features["area_um2"], dtype=np.float64) * factor_y * factor_x
        if hasattr(layer, "current_size"):
            layer.current_size = float(np.mean(layer.current_size)) * linear
    elif kind == "shapes":
        if len(layer.data):
            widths = np.asarray(layer.edge_width, dtype=np.float64) * linear
            types = list(layer.shape_type)
            layer.data = [(_times(d, factors), t) for d, t in zip(layer.data, types, strict=True)]
            layer.edge_width = list(widths)
        if hasattr(layer, "current_edge_width"):
            layer.current_edge_width = float(layer.current_edge_width) * linear
    else:
        layer.scale = _times(layer.scale, factors)


def follow_slide_scale(layers: Iterable[Any], slide_layer: Any, old_scale: Any = None) -> list[Any]:
    """Keep every layer derived from ``slide_layer``'s slide on it after its um/px changed.

    The one place derived layers follow a slide: heatmaps, detections, tissue masks,
    nuclei, prediction overlays and region shapes are tied to the slide's level-0
    pixels, so their world geometry scales by ``new / old`` um/px. Each layer's old
    scale is its :data:`PLACED_SCALE_KEY` (or a tissue layer's ``slide_mpp``), else
    ``old_scale``; afterwards it records the new one, so calling this again is a no-op.

    Parameters
    ----------
    layers : iterable
        The viewer's layers (anything with ``metadata``, ``scale``, ``translate``...).
    slide_layer : layer
        The slide layer; its metadata (``mpp_x``, ``mpp_y``) already holds the new um/px.
    old_scale : (float, float), optional
        The slide layer's ``scale`` ``(y, x)`` before the change, for derived layers that
        do not record theirs (made by code that does not call :func:`link_metadata`).

    Returns
    -------
    list
        The layers that were moved.
    """
    meta = slide_layer.metadata
    path = meta.get("path")
    new = tuple(link_metadata(meta)[PLACED_SCALE_KEY])  # the metadata is the truth (set first)
    units = ("micrometer", "micrometer") if meta.get("mpp_x") else ("pixel", "pixel")
    moved = []
    for layer in list(layers):
        if layer is slide_layer or not is_derived_from(getattr(layer, "metadata", {}) or {}, path):
            continue
        old = placed_scale(layer.metadata)
        if old is None and old_scale is not None:
            old = tuple(float(v) for v in list(old_scale)[-2:])
        if old is None:
            continue
        factor_y, factor_x = new[0] / old[0], new[1] / old[1]
        changed = not np.allclose((factor_y, factor_x), 1.0, rtol=1e-12, atol=0)
        if changed:
            rescale_layer(layer, factor_y, factor_x)
        metadata = dict(layer.metadata)
        metadata[SOURCE_KEY] = path
        metadata[PLACED_SCALE_KEY] = list(new)
        if changed and metadata.get("mask_mpp") is not None and metadata.get("slide_mpp") is not None:
            metadata["mask_mpp"] = float(metadata["mask_mpp"]) * factor_x  # a tissue mask's grid
            metadata["slide_mpp"] = [new[1], new[0]]
        layer.metadata = metadata
        if changed and units and len(tuple(getattr(layer, "units", ()))) == len(units):
            layer.units = units
        if changed:
            moved.append(layer)
    return moved


# --------------------------------------------------------------------------- remembered um/px


def adopt_pixel_shapes(layer: Any, slide_layer: Any) -> bool:
    """Put a Shapes layer made in pixel units (napari's own new-shapes button) on a slide's micrometres.

    A pixel-unit layer beside micrometre slides makes napari's scale bar lose its unit
    and warn "Inconsistent units across layers" on every change. An empty layer (made
    by the button, drawn afterwards in world micrometres) only takes the slide's units;
    one that already holds shapes has them in slide pixels, so it also takes the
    slide's ``scale``. Either way it is tied to the slide (:func:`link_metadata`).

    Parameters
    ----------
    layer : napari.layers.Shapes
        The new layer.
    slide_layer : napari.layers.Image
        A slide layer shown in micrometres.

    Returns
    -------
    bool
        Whether the layer was changed (False for layers already in micrometres, or
        when the slide itself has no um/px).
    """
    units = tuple(str(u) for u in getattr(slide_layer, "units", ()))
    mine = tuple(str(u) for u in getattr(layer, "units", ()))
    if not units or units[-1] == "pixel" or not mine or mine[-1] != "pixel":
        return False
    if len(layer.data):
        scale = np.array(layer.scale, dtype=np.float64)
        scale[-2:] = np.asarray(slide_layer.scale, dtype=np.float64)[-2:]
        layer.scale = scale
    layer.units = (tuple(slide_layer.units)[-1],) * len(mine)
    layer.metadata = {**dict(layer.metadata), **link_metadata(slide_layer.metadata)}
    return True
