from __future__ import annotations

import json

import numpy as np
import pytest

from napari_pathology.geometry import (
    field_to_polygons,
    geojson_to_polygons,
    mask_to_polygons,
    polygon_area,
    polygons_to_geojson,
    rasterize_polygons,
    ring_signed_area,
)


def square_with_hole() -> np.ndarray:
    mask = np.zeros((32, 40), dtype=bool)
    mask[4:24, 6:30] = True  # 20 x 24
    mask[10:16, 12:20] = False  # 6 x 8 hole
    return mask


def test_square_with_hole_area_orientation_and_raster_round_trip() -> None:
    mask = square_with_hole()
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 1
    outer, *holes = polygons[0]
    assert len(holes) == 1
    assert ring_signed_area(outer) > 0 > ring_signed_area(holes[0])
    # Marching squares cuts each convex corner by 1/8 px and each hole corner likewise.
    assert polygon_area(polygons[0]) == pytest.approx(mask.sum(), abs=1.0)
    assert np.array_equal(rasterize_polygons(polygons, mask.shape), mask)


def test_scale_and_offset_map_mask_pixels_to_level0_edges() -> None:
    mask = square_with_hole()
    polygons = mask_to_polygons(mask, scale=16.0, offset=(100.0, 50.0))
    outer = polygons[0][0]
    assert outer[:, 0].min() == pytest.approx(100 + 6 * 16)
    assert outer[:, 0].max() == pytest.approx(100 + 30 * 16)
    assert outer[:, 1].min() == pytest.approx(50 + 4 * 16)
    assert polygon_area(polygons[0]) == pytest.approx(mask.sum() * 256, rel=0.01)
    back = rasterize_polygons(polygons, mask.shape, scale=16.0, offset=(100.0, 50.0))
    assert np.array_equal(back, mask)


def test_geojson_round_trip_is_qupath_style_and_closed() -> None:
    polygons = mask_to_polygons(square_with_hole())
    geojson = json.loads(json.dumps(polygons_to_geojson(polygons)))
    assert geojson["type"] == "FeatureCollection"
    [feature] = geojson["features"]
    assert feature["geometry"]["type"] == "Polygon"
    assert feature["properties"]["objectType"] == "annotation"
    assert feature["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    for ring in feature["geometry"]["coordinates"]:
        assert ring[0] == ring[-1]
    back = geojson_to_polygons(geojson)
    assert len(back) == 1 and len(back[0]) == 2
    for a, b in zip(polygons[0], back[0], strict=True):
        np.testing.assert_allclose(a, b)
    assert polygon_area(back[0]) == pytest.approx(polygon_area(polygons[0]))


def test_multipolygon_feature_and_bare_geometry_are_read() -> None:
    square = [[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]
    other = [[10, 10], [12, 10], [12, 12], [10, 12], [10, 10]]
    feature = {
        "type": "Feature",
        "geometry": {"type": "MultiPolygon", "coordinates": [[square], [other]]},
        "properties": {},
    }
    polygons = geojson_to_polygons(feature)
    assert [polygon_area(p) for p in polygons] == [16.0, 4.0]
    assert len(geojson_to_polygons({"type": "Polygon", "coordinates": [square]})) == 1
    assert geojson_to_polygons({"type": "FeatureCollection", "features": []}) == []


def test_island_in_hole_is_its_own_polygon_and_min_area_filters() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[2:38, 2:38] = True
    mask[8:32, 8:32] = False
    mask[15:25, 15:25] = True  # island inside the hole
    mask[0, 39] = True  # a speck
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 3
    assert sorted(len(p) for p in polygons) == [1, 1, 2]
    assert np.array_equal(rasterize_polygons(polygons, mask.shape), mask)
    big = mask_to_polygons(mask, min_area=5.0)
    assert len(big) == 2


def test_simplification_reduces_vertices_but_keeps_area() -> None:
    yy, xx = np.mgrid[:200, :200]
    disc = (yy - 100) ** 2 + (xx - 100) ** 2 < 80**2
    full = mask_to_polygons(disc)
    simple = mask_to_polygons(disc, tolerance=0.7)
    assert len(simple[0][0]) < len(full[0][0]) / 2
    assert polygon_area(simple[0]) == pytest.approx(disc.sum(), rel=0.01)


def test_field_polygons_agree_with_thresholded_field() -> None:
    rng = np.random.default_rng(0)
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.standard_normal((120, 90)), 6)
    field /= field.std()
    polygons = field_to_polygons(field, 0.3, scale=4.0)
    raster = rasterize_polygons(polygons, field.shape, scale=4.0)
    truth = field > 0.3
    iou = (raster & truth).sum() / (raster | truth).sum()
    assert iou > 0.97
    assert field_to_polygons(np.zeros((5, 5)), 0.0) == []
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []


def _feature(coordinates, kind: str = "Polygon") -> dict:
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coordinates}, "properties": {}}


SQUARE = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]


@pytest.mark.parametrize(
    ("ring", "message"),
    [
        ([[0, 0], [10, 0], [0, 0]], "at least 3 distinct points, this one has 2"),
        ([[0, 0], [10, 0], [10, 0], [0, 0]], "at least 3 distinct points, this one has 2"),
        ([[0, 0], [float("nan"), float("nan")], [10, 10], [0, 10]], "vertex 1 is not a finite number"),
        ([[0, 0], [float("inf"), 0], [10, 10]], "not a finite number"),
        ([[0, 0], [10, 0], [10]], "not a list of"),
        ([1, 2, 3], "not a list of"),
    ],
)
def test_geojson_rings_are_validated_with_the_feature_named(ring, message) -> None:
    collection = {"type": "FeatureCollection", "features": [_feature([SQUARE]), _feature([ring])]}
    with pytest.raises(ValueError, match=f"feature 1: .*{message}"):
        geojson_to_polygons(collection)


def test_bad_holes_and_multipolygon_parts_are_named() -> None:
    with pytest.raises(ValueError, match=r"feature 0, hole 1: .*distinct"):
        geojson_to_polygons(_feature([SQUARE, [[1, 1], [2, 2]]]))
    with pytest.raises(ValueError, match=r"feature 0, part 1: .*finite"):
        geojson_to_polygons(_feature([[SQUARE], [[[0, 0], [1, None], [2, 2]]]], "MultiPolygon"))
    with pytest.raises(ValueError, match="feature 0: not a GeoJSON object"):
        geojson_to_polygons(["not a feature"])
    with pytest.raises(ValueError, match="feature 0: a polygon needs a list of rings"):
        geojson_to_polygons(_feature([]))


def test_three_dimensional_points_keep_x_and_y() -> None:
    [[ring]] = geojson_to_polygons(_feature([[[0, 0, 5], [10, 0, 5], [10, 10, 5], [0, 0, 5]]]))
    assert ring.tolist() == [[0, 0], [10, 0], [10, 10]]


def test_huge_coordinates_and_polygons_off_the_image_are_refused_when_asked() -> None:
    huge = _feature([[[0, 0], [1e12, 0], [1e12, 1e12]]])
    assert len(geojson_to_polygons(huge)) == 1  # no limit asked for
    with pytest.raises(ValueError, match="feature 0: coordinate 1e\\+12 is larger than 1e\\+07"):
        geojson_to_polygons(huge, max_coordinate=1e7)
    outside = _feature([[[5000, 5000], [5100, 5000], [5100, 5100]]])
    with pytest.raises(ValueError, match=r"feature 0: .*entirely outside the slide"):
        geojson_to_polygons(outside, extent=(1000, 1000))
    partly = _feature([[[900, 900], [1100, 900], [1100, 1100]]])
    assert len(geojson_to_polygons(partly, extent=(1000, 1000))) == 1
