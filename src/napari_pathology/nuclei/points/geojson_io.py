"""Nuclei in GeoJSON: QuPath points in level-0 pixels, in and out."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.fileio import atomic_write, read_json_file

from .checks import NucleusFileError, _check_measurements, check_centroids
from .labels import (
    LABEL_COLOURS,
    LABELS,
    OTHER,
    QUPATH_CLASSES,
    SOURCES,
    UNLABELED,
    _parse_source,
    parse_label,
)
from .table import NucleusPoints


def _mpp_pair(mpp: float | Sequence[float]) -> tuple[float, float]:
    pair = (float(mpp), float(mpp)) if np.ndim(mpp) == 0 else tuple(float(v) for v in mpp)  # type: ignore[arg-type]
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        raise ValueError(f"mpp (um per pixel) must be a positive number or an (x, y) pair, got {mpp!r}")
    return pair  # type: ignore[return-value]


def to_geojson(
    points: NucleusPoints, mpp: float | Sequence[float], object_type: str = "annotation"
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection that QuPath imports (File > Import objects, or drag and drop).

    One ``Point`` feature per nucleus, in level-0 **pixels** from the image's top-left
    corner (QuPath's frame: ``x_px = x_um / mpp``). ``properties`` hold QuPath's
    ``objectType``, a ``classification`` ``{name, color}`` (Tumor, Normal, Other;
    none for unlabeled nuclei), ``measurements`` (``probability``, ``area_um2``;
    NaN left out) and this plugin's own ``label`` and ``source``, so that
    :func:`from_geojson` gives the table back exactly.

    Parameters
    ----------
    points : NucleusPoints
        The nuclei.
    mpp : float or (float, float)
        Level-0 micrometres per pixel of the slide.
    object_type : str
        ``"annotation"`` (QuPath point annotations, editable) or ``"detection"``
        (lighter in QuPath for 10^5+ nuclei).

    Returns
    -------
    dict
        The FeatureCollection (write it with :func:`write_geojson`).

    """
    if object_type not in ("annotation", "detection"):
        raise ValueError(f"object_type must be 'annotation' or 'detection', got {object_type!r}")
    mx, my = _mpp_pair(mpp)
    x_px = (points.x_um / mx).tolist()
    y_px = (points.y_um / my).tolist()
    # float32 through its shortest text, so JSON shows 0.9 rather than 0.8999999761581421
    prob, area = (_short(points.probability), _short(points.area_um2))
    labels, sources = points.label.tolist(), points.source.tolist()
    classes = [
        None if i == UNLABELED else {"name": QUPATH_CLASSES[n], "color": list(LABEL_COLOURS[n])}
        for i, n in enumerate(LABELS)
    ]
    features = []
    for i in range(len(points)):
        properties: dict[str, Any] = {"objectType": object_type}
        if classes[labels[i]] is not None:
            properties["classification"] = classes[labels[i]]
        measurements = {
            k: v for k, v in (("probability", prob[i]), ("area_um2", area[i])) if not math.isnan(v)
        }
        if measurements:
            properties["measurements"] = measurements
        properties["label"] = LABELS[labels[i]]
        properties["source"] = SOURCES[sources[i]]
        features.append(
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [x_px[i], y_px[i]]},
             "properties": properties}
        )  # fmt: skip
    return {"type": "FeatureCollection", "features": features}


def _short(values: np.ndarray) -> list[float]:
    return values.astype(str).astype(np.float64).tolist()


def _features(obj: Any) -> list[Any]:
    if isinstance(obj, list):
        return obj
    if not isinstance(obj, dict):
        raise ValueError(f"GeoJSON must be an object or a list of features, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind == "FeatureCollection":
        features = obj.get("features") or []
        if not isinstance(features, list):
            raise ValueError(f"GeoJSON 'features' must be a list, got {type(features).__name__}")
        return features
    if kind == "Feature":
        return [obj]
    if kind == "GeometryCollection":
        geometries = obj.get("geometries") or []
        if not isinstance(geometries, list):
            raise ValueError(f"GeoJSON 'geometries' must be a list, got {type(geometries).__name__}")
        return [{"type": "Feature", "geometry": g, "properties": {}} for g in geometries]
    if kind in ("Point", "MultiPoint", "Polygon", "MultiPolygon", "LineString", "MultiLineString"):
        return [{"type": "Feature", "geometry": obj, "properties": {}}]
    raise ValueError(f"not GeoJSON: expected a FeatureCollection, a Feature or a geometry, got type {kind!r}")


def _measurement(measurements: Any, name: str) -> float:
    if isinstance(measurements, dict):
        value = measurements.get(name)
    elif isinstance(measurements, list):  # QuPath before v0.4: [{"name": ..., "value": ...}]
        value = next(
            (m.get("value") for m in measurements if isinstance(m, dict) and m.get("name") == name), None
        )
    else:
        value = None
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _feature_label(properties: dict[str, Any], unknown: dict[str, int]) -> int:
    if "label" in properties:
        return parse_label(properties["label"])
    classification = properties.get("classification")
    name = classification.get("name") if isinstance(classification, dict) else classification
    if name is None:
        return UNLABELED
    try:
        return parse_label(str(name))
    except ValueError:
        unknown[str(name)] = unknown.get(str(name), 0) + 1
        return OTHER


def _coordinate(value: Any) -> float:
    """A JSON number as float; anything else (text, null, true) is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"coordinate {value!r} is not a number")
    return float(value)


def from_geojson(
    obj: dict[str, Any] | list[Any],
    mpp: float | Sequence[float],
    extent_um: tuple[float, float] | None = None,
) -> NucleusPoints:
    """Nuclei from GeoJSON points in level-0 pixels (QuPath's export, or :func:`to_geojson`'s).

    Reads ``Point`` and ``MultiPoint`` features (every point of a MultiPoint gets
    its feature's class) from a FeatureCollection, a single feature, a geometry
    or a bare list of features. The label is the plugin's own ``label``
    property when present, else the QuPath classification name
    (case-insensitive, through :func:`parse_label`: Tumor, Normal, Stroma,
    Immune cells, Other...); an unknown class becomes ``other`` with a warning.
    Non-point features (polygons, lines) are skipped with a warning, and a file
    with only such features is refused. Coordinates must be finite numbers on
    the slide (``extent_um``, when given); the first bad feature is named
    (``feature 3`` is the third in the file).

    Parameters
    ----------
    obj : dict or list
        Parsed GeoJSON.
    mpp : float or (float, float)
        Level-0 micrometres per pixel of the slide.
    extent_um : (width_um, height_um), optional
        The slide's size in micrometres; points outside it are refused.

    Returns
    -------
    NucleusPoints
        Sources from the ``source`` property, ``imported`` when absent.

    Raises
    ------
    ValueError
        For something that is not GeoJSON, has no point features but other
        geometry, or holds a bad point (naming the feature).

    """
    mx, my = _mpp_pair(mpp)
    xs: list[float] = []
    ys: list[float] = []
    owner: list[int] = []  # feature number (1-based) of each point
    labels: list[int] = []
    probs: list[float] = []
    areas: list[float] = []
    sources: list[int] = []
    skipped: dict[str, int] = {}
    unknown: dict[str, int] = {}
    for number, feature in enumerate(_features(obj), start=1):
        if not isinstance(feature, dict):
            raise ValueError(f"feature {number}: must be an object, got {type(feature).__name__}")
        geometry = feature.get("geometry") if feature.get("type") == "Feature" else feature
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        if kind == "Point":
            coords = [geometry.get("coordinates")]
        elif kind == "MultiPoint":
            coords = geometry.get("coordinates")
            if not isinstance(coords, list):
                raise ValueError(f"feature {number}: MultiPoint coordinates must be a list of [x, y]")
        else:
            skipped[str(kind)] = skipped.get(str(kind), 0) + 1
            continue
        properties = feature.get("properties") or {}
        if not isinstance(properties, dict):
            raise ValueError(
                f"feature {number}: properties must be an object, got {type(properties).__name__}"
            )
        try:
            label = _feature_label(properties, unknown)
            source = _parse_source(properties.get("source", "imported"))
        except ValueError as exc:
            raise ValueError(f"feature {number}: {exc}") from exc
        measurements = properties.get("measurements")
        prob, area = _measurement(measurements, "probability"), _measurement(measurements, "area_um2")
        for c in coords:
            if not isinstance(c, (list, tuple)) or len(c) < 2:
                raise ValueError(f"feature {number}: point coordinates must be [x, y], got {c!r}")
            try:
                x, y = _coordinate(c[0]), _coordinate(c[1])
            except ValueError as exc:
                raise ValueError(f"feature {number}: {exc}") from None
            xs.append(x * mx)
            ys.append(y * my)
            owner.append(number)
            labels.append(label)
            probs.append(prob)
            areas.append(area)
            sources.append(source)
    if skipped:
        what = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items()))
        if not xs:
            raise ValueError(
                f"no Point or MultiPoint features to read as nuclei (found {what}); "
                "export nuclei as points (centroids), not outlines"
            )
        warnings.warn(
            f"skipped {what} feature(s): nuclei are read from points only", UserWarning, stacklevel=2
        )
    x_um, y_um = np.asarray(xs, np.float64), np.asarray(ys, np.float64)

    def where(i: int) -> str:
        return f"feature {owner[i]}"

    check_centroids(x_um, y_um, extent_um, where)
    probability, area_um2 = np.asarray(probs, np.float32), np.asarray(areas, np.float32)
    _check_measurements(np.asarray(probs), np.asarray(areas), where)
    if unknown:
        names = ", ".join(f"{k!r} ({v})" for k, v in sorted(unknown.items()))
        warnings.warn(f"unknown classification {names} read as 'other'", UserWarning, stacklevel=2)
    return NucleusPoints(
        x_um, y_um, label=np.asarray(labels, np.int8), probability=probability, area_um2=area_um2,
        source=np.asarray(sources, np.int8),
    )  # fmt: skip


def write_geojson(
    points: NucleusPoints,
    path: str | os.PathLike[str],
    mpp: float | Sequence[float],
    object_type: str = "annotation",
) -> None:
    """Write :func:`to_geojson` to ``path`` atomically (QuPath: File > Import objects, or drag and drop).

    Raises
    ------
    OutputError
        When the file system refuses the write (one line naming the folder).

    """
    text = json.dumps(to_geojson(points, mpp, object_type), separators=(",", ":"), allow_nan=False)
    atomic_write(path, text)


def read_geojson(
    path: str | os.PathLike[str],
    mpp: float | Sequence[float],
    extent_um: tuple[float, float] | None = None,
) -> NucleusPoints:
    """Read nuclei from a GeoJSON file (see :func:`from_geojson`); every error names the file.

    Parameters
    ----------
    path : path-like
        The GeoJSON file (regular, UTF-8; too deep nesting, NaN constants and
        syntax errors are refused through :func:`napari_pathology.fileio.read_json_file`).
    mpp : float or (float, float)
        Level-0 micrometres per pixel of the slide.
    extent_um : (width_um, height_um), optional
        The slide's size in micrometres; points outside it are refused.

    Raises
    ------
    NucleusFileError
        Naming the file, and the feature at fault.

    """
    path = Path(path)
    try:
        obj = read_json_file(path, "nucleus GeoJSON")
    except (ValueError, FileNotFoundError) as exc:
        raise NucleusFileError(f"{exc}") from exc
    try:
        return from_geojson(obj, mpp, extent_um)
    except NucleusFileError:
        raise
    except ValueError as exc:
        raise NucleusFileError(f"{path}: {exc}") from exc
