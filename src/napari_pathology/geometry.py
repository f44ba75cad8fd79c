"""Polygons from masks and fields, GeoJSON conversion and rasterisation.

A *polygon* is a list of rings: the outer boundary first, then its holes. Each
ring is an ``(N, 2)`` float array of ``(x, y)`` vertices, open (the first vertex
is not repeated at the end). Coordinates use the *pixel-edge* convention: pixel
``(row, col)`` of an image covers ``[col, col + 1) x [row, row + 1)``, so its
centre is at ``(col + 0.5, row + 0.5)``. With ``scale`` and ``offset`` a mask or
field pixel maps to ``x = (col + 0.5) * scale + offset[0]`` (and likewise for
``y``), which is how low-resolution masks are brought to level-0 pixels.

Outer rings are returned with positive signed area (see :func:`ring_signed_area`),
holes with negative signed area.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from skimage.draw import polygon as draw_polygon
from skimage.measure import approximate_polygon, find_contours, points_in_poly

Ring = np.ndarray
Polygon = list[np.ndarray]

#: Coordinates past this (level-0 px, or um) come from wrong units or a corrupt file, not a slide.
MAX_COORDINATE = 1e7

__all__ = [
    "MAX_COORDINATE",
    "Polygon",
    "Ring",
    "field_to_polygons",
    "geojson_to_polygons",
    "mask_to_polygons",
    "points_in_polygons",
    "polygon_area",
    "polygon_bounds",
    "polygons_to_geojson",
    "rasterize_polygons",
    "ring_signed_area",
    "validate_ring",
]


def ring_signed_area(ring: np.ndarray) -> float:
    """Signed area of a ring by the shoelace formula.

    Parameters
    ----------
    ring : ndarray
        ``(N, 2)`` array of ``(x, y)`` vertices, open or closed.

    Returns
    -------
    float
        Positive for counter-clockwise rings in a y-up frame (clockwise as seen
        on screen with y pointing down), negative otherwise.

    """
    ring = np.asarray(ring, dtype=np.float64)
    if len(ring) < 3:
        return 0.0
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def polygon_area(polygon: Polygon) -> float:
    """Area of a polygon: outer ring minus its holes.

    Parameters
    ----------
    polygon : list of ndarray
        Rings, outer first.

    Returns
    -------
    float
        Area in squared coordinate units (non-negative).

    """
    if not polygon:
        return 0.0
    area = abs(ring_signed_area(polygon[0]))
    for hole in polygon[1:]:
        area -= abs(ring_signed_area(hole))
    return max(area, 0.0)


def polygon_bounds(polygon: Polygon) -> tuple[float, float, float, float]:
    """Bounding box ``(xmin, ymin, xmax, ymax)`` of a polygon's outer ring."""
    outer = np.asarray(polygon[0], dtype=np.float64)
    return (
        float(outer[:, 0].min()),
        float(outer[:, 1].min()),
        float(outer[:, 0].max()),
        float(outer[:, 1].max()),
    )


def points_in_polygons(xy: np.ndarray, polygons: Sequence[Polygon]) -> np.ndarray:
    """Index of the first polygon that contains each point, holes honoured.

    Parameters
    ----------
    xy : ndarray
        ``(N, 2)`` array of ``(x, y)`` points, in the polygons' units.
    polygons : sequence of polygon
        Polygons ``[outer, hole, ...]`` (see the module docstring).

    Returns
    -------
    ndarray
        ``(N,)`` int64: the index into ``polygons`` of the first polygon whose
        outer ring contains the point and none of whose holes does, or -1.
        Points exactly on a ring may fall either way.

    Examples
    --------
    >>> square = [np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)]
    >>> points_in_polygons(np.array([[5.0, 5.0], [20.0, 5.0]]), [square]).tolist()
    [0, -1]

    """
    pts = np.asarray(xy, dtype=np.float64)
    if pts.size == 0:
        return np.full(0, -1, np.int64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"xy must be an (N, 2) array of x, y points, got shape {pts.shape}")
    out = np.full(len(pts), -1, np.int64)
    for index, polygon in enumerate(polygons):
        if not len(polygon) or len(polygon[0]) < 3:
            continue
        outer = np.asarray(polygon[0], dtype=np.float64)
        lo, hi = outer.min(axis=0), outer.max(axis=0)
        todo = out < 0
        todo &= (pts[:, 0] >= lo[0]) & (pts[:, 0] <= hi[0]) & (pts[:, 1] >= lo[1]) & (pts[:, 1] <= hi[1])
        candidates = np.flatnonzero(todo)
        if not len(candidates):
            continue
        inside = points_in_poly(pts[candidates], outer)
        for hole in polygon[1:]:
            hole = np.asarray(hole, dtype=np.float64)
            if len(hole) >= 3 and inside.any():
                inside[inside] = ~points_in_poly(pts[candidates[inside]], hole)
        out[candidates[inside]] = index
    return out


def _open_ring(contour: np.ndarray) -> np.ndarray:
    if len(contour) > 1 and np.array_equal(contour[0], contour[-1]):
        return contour[:-1]
    return contour


def _contours_to_polygons(
    contours: list[np.ndarray],
    scale: float,
    offset: tuple[float, float],
    min_area: float,
    tolerance: float,
) -> list[Polygon]:
    """Turn marching-squares contours (row, col; pixel-centre indices) into polygons."""
    outers: list[tuple[np.ndarray, float]] = []
    holes: list[np.ndarray] = []
    for contour in contours:
        ring = _open_ring(contour)
        if len(ring) < 3:
            continue
        if tolerance > 0:
            simplified = _open_ring(approximate_polygon(np.vstack([ring, ring[:1]]), tolerance))
            if len(simplified) >= 3:
                ring = simplified
        xy = np.empty((len(ring), 2), dtype=np.float64)
        xy[:, 0] = (ring[:, 1] + 0.5) * scale + offset[0]
        xy[:, 1] = (ring[:, 0] + 0.5) * scale + offset[1]
        area = ring_signed_area(xy)
        if area == 0.0:
            continue
        # Contours traced with positive_orientation="high" wind so that the
        # shoelace area in (x, y) is negative around high regions.
        if area < 0:
            outers.append((xy[::-1].copy(), -area))
        else:
            holes.append(xy[::-1].copy())
    order = sorted(range(len(outers)), key=lambda i: outers[i][1])
    polygons: list[Polygon] = [[outers[i][0]] for i in range(len(outers))]
    for hole in holes:
        probe = hole[:1]
        for i in order:  # smallest enclosing outer ring wins
            outer, _ = outers[i]
            if points_in_poly(probe, outer)[0]:
                polygons[i].append(hole)
                break
    result = [p for p in polygons if polygon_area(p) >= min_area]
    # Deterministic order: top-to-bottom, then left-to-right.
    result.sort(key=lambda p: (float(p[0][:, 1].min()), float(p[0][:, 0].min())))
    return result


def field_to_polygons(
    field: np.ndarray,
    level: float = 0.0,
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
    min_area: float = 0.0,
    tolerance: float = 0.0,
) -> list[Polygon]:
    """Polygons enclosing the region where a sampled field exceeds ``level``.

    Parameters
    ----------
    field : ndarray
        2-D array of samples at pixel centres.
    level : float
        Iso-value; the region is ``field > level``.
    scale : float
        Output units per field pixel.
    offset : tuple of float
        ``(x, y)`` added after scaling.
    min_area : float
        Drop polygons smaller than this (output units squared).
    tolerance : float
        If positive, simplify rings with
        :func:`skimage.measure.approximate_polygon` (in field pixels).

    Returns
    -------
    list of polygon
        Each polygon is ``[outer, hole, ...]`` of ``(N, 2)`` ``(x, y)`` arrays.

    """
    field = np.asarray(field, dtype=np.float64)
    if field.ndim != 2:
        raise ValueError("field must be 2-D")
    if field.size == 0 or not np.any(field > level):
        return []
    span = float(np.nanmax(np.abs(field - level))) if field.size else 1.0
    pad_value = level - max(span, 1.0) * 1e3
    padded = np.pad(field, 1, mode="constant", constant_values=pad_value)
    contours = find_contours(padded, level, fully_connected="high", positive_orientation="high")
    contours = [c - 1.0 for c in contours]
    return _contours_to_polygons(contours, scale, offset, min_area, tolerance)


def mask_to_polygons(
    mask: np.ndarray,
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
    min_area: float = 0.0,
    tolerance: float = 0.0,
) -> list[Polygon]:
    """Polygons (with holes) outlining the ``True`` pixels of a boolean mask.

    Contours run half-way between pixel centres (marching squares on the
    zero-padded mask at level 0.5), so rasterising the result with
    :func:`rasterize_polygons` gives the mask back.

    Parameters
    ----------
    mask : ndarray
        2-D boolean mask.
    scale : float
        Output units per mask pixel (e.g. the mask's downsample factor).
    offset : tuple of float
        ``(x, y)`` added after scaling.
    min_area : float
        Drop polygons smaller than this (output units squared).
    tolerance : float
        If positive, simplify rings (in mask pixels).

    Returns
    -------
    list of polygon
        Each polygon is ``[outer, hole, ...]`` of ``(N, 2)`` ``(x, y)`` arrays.

    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError("mask must be 2-D")
    if not mask.any():
        return []
    padded = np.pad(mask.astype(np.float64), 1, mode="constant", constant_values=0.0)
    contours = find_contours(padded, 0.5, fully_connected="high", positive_orientation="high")
    contours = [c - 1.0 for c in contours]
    return _contours_to_polygons(contours, scale, offset, min_area, tolerance)


def rasterize_polygons(
    polygons: Sequence[Polygon],
    shape: tuple[int, int],
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Rasterise polygons into a boolean mask, carving holes.

    Parameters
    ----------
    polygons : sequence of polygon
        Polygons in output units (see :func:`mask_to_polygons`).
    shape : tuple of int
        ``(rows, cols)`` of the mask.
    scale : float
        Polygon units per mask pixel.
    offset : tuple of float
        ``(x, y)`` subtracted before scaling.

    Returns
    -------
    ndarray
        Boolean mask; a pixel is set when its centre lies inside a polygon.

    """
    out = np.zeros(tuple(int(s) for s in shape), dtype=bool)
    for polygon in polygons:
        for k, ring in enumerate(polygon):
            ring = np.asarray(ring, dtype=np.float64)
            if len(ring) < 3:
                continue
            cols = (ring[:, 0] - offset[0]) / scale - 0.5
            rows = (ring[:, 1] - offset[1]) / scale - 0.5
            rr, cc = draw_polygon(rows, cols, shape=out.shape)
            out[rr, cc] = k == 0
    return out


def _close(ring: np.ndarray) -> list[list[float]]:
    pts = [[float(x), float(y)] for x, y in np.asarray(ring, dtype=np.float64)]
    if pts and pts[0] != pts[-1]:
        pts.append(list(pts[0]))
    return pts


def polygons_to_geojson(
    polygons: Sequence[Polygon],
    classification: str = "Tumor",
    color: tuple[int, int, int] = (200, 0, 0),
    object_type: str = "annotation",
) -> dict[str, Any]:
    """QuPath-style GeoJSON FeatureCollection of Polygon features.

    Parameters
    ----------
    polygons : sequence of polygon
        Polygons to export; rings are closed on output.
    classification : str
        Class name written to ``properties.classification.name``.
    color : tuple of int
        RGB class colour.
    object_type : str
        QuPath object type (``"annotation"`` or ``"detection"``).

    Returns
    -------
    dict
        A GeoJSON ``FeatureCollection``.

    """
    features = []
    for polygon in polygons:
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [_close(ring) for ring in polygon],
                },
                "properties": {
                    "objectType": object_type,
                    "classification": {
                        "name": classification,
                        "color": [int(c) for c in color],
                    },
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def validate_ring(ring: Any, where: str = "ring") -> np.ndarray:
    """A ring of ``(x, y)`` vertices as an open ``(N, 2)`` float array, refused when unusable.

    Parameters
    ----------
    ring : array-like
        ``[[x, y], ...]`` (extra coordinates such as ``z`` are dropped), open or closed.
    where : str
        Names the ring in messages (e.g. ``"feature 3"``).

    Raises
    ------
    ValueError
        Not a list of points, a non-finite coordinate, or fewer than 3 distinct vertices.
    """
    try:
        arr = np.asarray(ring, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: coordinates are not a list of [x, y] points") from None
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"{where}: coordinates are not a list of [x, y] points (shape {arr.shape})")
    arr = arr[:, :2]
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise ValueError(f"{where}: vertex {bad} is not a finite number ({arr[bad].tolist()})")
    arr = _open_ring(arr)
    distinct = len(np.unique(arr, axis=0)) if len(arr) else 0
    if distinct < 3:
        raise ValueError(f"{where}: a polygon needs at least 3 distinct points, this one has {distinct}")
    return arr


def _rings_from_coords(coords: Any, where: str) -> Polygon:
    if not isinstance(coords, list | tuple) or not coords:
        raise ValueError(f"{where}: a polygon needs a list of rings, got {type(coords).__name__}")
    rings = []
    for k, ring in enumerate(coords):
        rings.append(validate_ring(ring, where if k == 0 else f"{where}, hole {k}"))
    return rings


def _check_placement(
    polygon: Polygon, where: str, max_coordinate: float | None, extent: tuple[float, float] | None
) -> None:
    outer = polygon[0]
    if max_coordinate is not None:
        largest = float(np.abs(np.concatenate(polygon)).max())
        if largest > max_coordinate:
            raise ValueError(
                f"{where}: coordinate {largest:.4g} is larger than {max_coordinate:.4g}; "
                "wrong units or a corrupt file"
            )
    if extent is not None:
        width, height = extent
        x0, y0 = outer.min(axis=0)
        x1, y1 = outer.max(axis=0)
        if x1 < 0 or y1 < 0 or x0 > width or y0 > height:
            raise ValueError(
                f"{where}: the polygon ({x0:.0f}..{x1:.0f}, {y0:.0f}..{y1:.0f}) lies entirely outside "
                f"the slide (0..{width:.0f}, 0..{height:.0f}); wrong slide or wrong units?"
            )


def geojson_to_polygons(
    geojson: dict[str, Any] | list[Any],
    *,
    max_coordinate: float | None = None,
    extent: tuple[float, float] | None = None,
) -> list[Polygon]:
    """Read Polygon / MultiPolygon geometries from GeoJSON, refusing unusable ones.

    Every ring is checked (:func:`validate_ring`): finite coordinates and at
    least 3 distinct vertices. Features without a geometry, and geometries
    other than polygons, are skipped.

    Parameters
    ----------
    geojson : dict or list
        A FeatureCollection, a Feature, a bare geometry or a list of features.
    max_coordinate : float, optional
        Refuse a polygon with a coordinate larger than this (in absolute value).
    extent : tuple of float, optional
        ``(width, height)`` of the image in the file's units: refuse a polygon
        whose outer ring lies entirely outside ``[0, width] x [0, height]``.

    Returns
    -------
    list of polygon
        Open rings, outer first.

    Raises
    ------
    ValueError
        Naming the feature (``feature 3``) and the cause.

    """
    return _polygons_of(geojson, "feature", max_coordinate, extent)


def _polygons_of(
    geojson: Any, label: str, max_coordinate: float | None, extent: tuple[float, float] | None
) -> list[Polygon]:
    if isinstance(geojson, list):
        items: list[Any] = list(geojson)
    elif not isinstance(geojson, dict):
        kind = type(geojson).__name__
        raise ValueError(f"not GeoJSON: expected an object or a list of features, got {kind}")
    elif geojson.get("type") == "FeatureCollection":
        features = geojson.get("features", [])
        if not isinstance(features, list):
            raise ValueError("not GeoJSON: 'features' is not a list")
        items = list(features)
    else:
        items = [geojson]
    polygons: list[Polygon] = []
    for index, item in enumerate(items):
        where = f"{label} {index}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: not a GeoJSON object ({type(item).__name__})")
        geometry = item.get("geometry") if item.get("type") == "Feature" else item
        if geometry is None:
            continue
        if not isinstance(geometry, dict):
            raise ValueError(f"{where}: the geometry is not a GeoJSON object")
        kind = geometry.get("type")
        found: list[Polygon] = []
        if kind == "Polygon":
            found = [_rings_from_coords(geometry.get("coordinates"), where)]
        elif kind == "MultiPolygon":
            parts = geometry.get("coordinates")
            if not isinstance(parts, list | tuple):
                raise ValueError(f"{where}: a MultiPolygon needs a list of polygons")
            found = [_rings_from_coords(c, f"{where}, part {k}") for k, c in enumerate(parts)]
        elif kind == "GeometryCollection":
            members = geometry.get("geometries", [])
            polygons.extend(_polygons_of(list(members or []), f"{where}, geometry", max_coordinate, extent))
        for polygon in found:
            _check_placement(polygon, where, max_coordinate, extent)
        polygons.extend(found)
    return polygons


def summed_area_table(mask: np.ndarray) -> np.ndarray:
    """Summed-area table of a mask with a zero first row and column (``(H + 1, W + 1)`` float64)."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1, out=table[1:, 1:])
    return table


def area_below(table: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mask area in ``[0, x) x [0, y)`` (mask pixel units, fractional corners allowed).

    The integral of a piecewise-constant image is bilinear inside each pixel,
    so bilinear interpolation of the summed-area ``table`` at fractional
    corners is exact. Corners outside the mask are clipped to it.
    """
    h, w = table.shape[0] - 1, table.shape[1] - 1
    x = np.clip(x, 0.0, w)
    y = np.clip(y, 0.0, h)
    x0 = np.minimum(np.floor(x).astype(np.int64), max(w - 1, 0))
    y0 = np.minimum(np.floor(y).astype(np.int64), max(h - 1, 0))
    fx, fy = x - x0, y - y0
    x1, y1 = np.minimum(x0 + 1, w), np.minimum(y0 + 1, h)
    top = table[y0, x0] * (1 - fx) + table[y0, x1] * fx
    bottom = table[y1, x0] * (1 - fx) + table[y1, x1] * fx
    return top * (1 - fy) + bottom * fy
