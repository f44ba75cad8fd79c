"""Where things sit: the physical centre of a pixel or grid cell, and napari's world coordinates for it.

The one home of the half-pixel. Physically, pixel (or grid cell) ``i`` of
side ``size_um`` covers ``[i, i + 1) * size_um`` micrometres from the slide's
top-left corner, so its centre is :func:`pixel_centre_um` ``(i) = (i + 0.5) *
size_um``: nucleus centroids, tile centres, tissue-mask and heatmap cells
are all physical in this sense.

napari draws data pixel ``i`` of a layer centred at ``translate + i *
scale``. The slide layer has ``scale = mpp`` and no translate, so its level-0
pixel ``i`` is drawn centred at ``i * mpp``: world coordinates are physical
ones shifted by the centre of level-0 pixel 0 (half a slide pixel).
:func:`world_from_um` and :func:`um_from_world` are that shift, for every
overlay (grids through :func:`napari_pathology._layers.overlay_geometry`,
points, shapes). No napari, no Qt.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["pixel_centre_um", "um_from_world", "world_from_um"]


def pixel_centre_um(index: float | np.ndarray, size_um: float, origin_um: float = 0.0) -> float | np.ndarray:
    """Micrometres of the centre of pixel/cell ``index`` of side ``size_um``: ``origin + (i + ½) size``.

    ``index`` may be fractional (a centroid in pixel units) or an array.

    Examples
    --------
    >>> pixel_centre_um(0, 0.5), pixel_centre_um(3, 2.0, origin_um=10.0)
    (0.25, 17.0)
    """
    centre = origin_um + (np.asarray(index, dtype=np.float64) + 0.5) * float(size_um)
    return float(centre) if np.ndim(centre) == 0 else centre


def _slide_shift(slide_mpp: Sequence[float] | None) -> tuple[float, float]:
    """``(x, y)`` physical centre of the slide's level-0 pixel 0 (pixel units when ``slide_mpp`` is None)."""
    mpp_x, mpp_y = (1.0, 1.0) if slide_mpp is None else (float(slide_mpp[0]), float(slide_mpp[1]))
    return pixel_centre_um(0, mpp_x), pixel_centre_um(0, mpp_y)  # type: ignore[return-value]


def world_from_um(xy_um: np.ndarray | Sequence[float], slide_mpp: Sequence[float] | None) -> np.ndarray:
    """The napari ``(y, x)`` world coordinates, ``(N, 2)``, of physical ``(x, y)`` micrometres.

    ``slide_mpp`` is the slide's level-0 ``(mpp_x, mpp_y)``; None when the slide
    is shown in pixels (then ``xy_um`` is in level-0 pixels too).
    """
    shift_x, shift_y = _slide_shift(slide_mpp)
    xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
    return np.column_stack([xy[:, 1] - shift_y, xy[:, 0] - shift_x])


def um_from_world(yx_world: np.ndarray | Sequence[float], slide_mpp: Sequence[float] | None) -> np.ndarray:
    """Physical ``(x, y)`` micrometres, ``(N, 2)``, of napari ``(y, x)`` world coordinates.

    The inverse of :func:`world_from_um`.
    """
    shift_x, shift_y = _slide_shift(slide_mpp)
    yx = np.asarray(yx_world, dtype=np.float64).reshape(-1, 2)
    return np.column_stack([yx[:, 1] + shift_x, yx[:, 0] + shift_y])
