"""Turn slides into napari layer data and back, without importing napari.

A slide layer is an RGB multiscale image layer whose ``scale`` is in
micrometres and whose ``metadata`` carries the slide's facts under plain keys
(``path``, ``backend``, ``vendor``, ``width``, ``height``, ``level_dimensions``,
``level_downsamples``, ``mpp_x``, ``mpp_y``, ``mpp_missing``,
``objective_power``...) plus the marker key :data:`SLIDE_MARKER`. Later steps
(tissue, analysis, annotation) find the slide again with
:func:`slide_from_metadata`, so a um/px set by the user is used everywhere.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from napari_pathology.slide import Slide, SlideReadError, open_slide

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
    its physical centre. Grids are described physically and shifted the same way.

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
    half_y, half_x = (slide_mpp[1] / 2, slide_mpp[0] / 2) if slide_mpp else (0.5, 0.5)
    return {
        "scale": (float(sy), float(sx)),
        "translate": (float(first_centre_um[0] - half_y), float(first_centre_um[1] - half_x)),
    }
