"""Nucleus annotations: labels, purity, regions, CSV / GeoJSON round trips, atomic autosave."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from napari_pathology.geometry import points_in_polygons
from napari_pathology.nuclei import (
    LABEL_COLOURS,
    LABELS,
    QUPATH_CLASSES,
    SOURCES,
    NucleusFileError,
    NucleusPoints,
    NucleusTable,
    from_geojson,
    load_sidecar,
    parse_label,
    read_csv,
    read_geojson,
    region_summaries,
    save_atomic,
    sidecar_path,
    to_geojson,
    write_csv,
    write_geojson,
)
from napari_pathology.nuclei.points import autosave as autosave_module

T, N, OTH, U = LABELS.index("tumour"), LABELS.index("normal"), LABELS.index("other"), 0


def _square(x0: float, y0: float, side: float) -> np.ndarray:
    return np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]], float)


def _table() -> NucleusPoints:
    """Ten nuclei: 4 tumour, 3 normal, 1 other, 2 unlabeled; 5 classified."""
    x = np.array([5.0, 15, 25, 35, 45, 55, 65, 75, 85, 95])
    return NucleusPoints(
        x_um=x,
        y_um=np.full(10, 50.0),
        label=np.array([T, T, T, T, N, N, N, OTH, U, U]),
        probability=np.array([0.9, 0.8, np.nan, 0.7, 0.2, np.nan, 0.1, np.nan, 0.5, np.nan]),
        area_um2=np.array([30.5, 41.25, np.nan, 28, 33, 29, np.nan, 20, 25, 26]),
        source=np.array([0, 0, 1, 2, 0, 1, 0, 2, 0, 1]),
    )


def test_constants_and_colours() -> None:
    assert LABELS == ("unlabeled", "tumour", "normal", "other")
    assert SOURCES == ("detected", "manual", "imported")
    assert QUPATH_CLASSES == {"tumour": "Tumor", "normal": "Normal", "other": "Other"}
    assert set(LABEL_COLOURS) == set(LABELS)
    tumour, normal = np.array(LABEL_COLOURS["tumour"]), np.array(LABEL_COLOURS["normal"])
    assert tumour[0] > 200 and normal[2] > 200  # red and blue: apart even without red-green vision
    assert abs(int(tumour[2]) - int(normal[2])) > 150


@pytest.mark.parametrize(
    ("text", "code"),
    [("tumour", T), ("Tumor", T), (" T ", T), ("cancer", T), ("Normal", N), ("n", N), ("Stroma", N),
     ("Immune cells", N), ("lymphocyte", N), ("other", OTH), ("Necrosis", OTH), ("Ignore*", OTH),
     ("unlabelled", U), ("", U), ("u", U), (2, N)],
)  # fmt: skip
def test_parse_label(text: str, code: int) -> None:
    assert parse_label(text) == code


@pytest.mark.parametrize(("text", "match"), [("1", "ambiguous"), ("banana", "tumour, normal"), (7, "0-3")])
def test_parse_label_rejects_with_the_accepted_names(text: str | int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_label(text)


def test_counts_purity_and_predicted_purity() -> None:
    pts = _table()
    assert pts.counts() == {"unlabeled": 2, "tumour": 4, "normal": 3, "other": 1, "total": 10}
    assert pts.purity() == pytest.approx(4 / 7)
    # mean over the 5 classified nuclei only (METHODS.md 3: sum of probabilities / nuclei)
    assert pts.predicted_purity() == pytest.approx((0.9 + 0.8 + 0.7 + 0.2 + 0.1 + 0.5) / 6, abs=1e-7)
    assert NucleusPoints.empty().purity() is None and NucleusPoints.empty().predicted_purity() is None
    only_other = NucleusPoints(np.zeros(2), np.zeros(2), label=[OTH, U])
    assert only_other.purity() is None and only_other.counts()["total"] == 2


def test_edit_subset_concat_and_validation() -> None:
    pts = _table()
    relabelled = pts.with_labels([8, 9], "tumor")
    assert relabelled.counts()["tumour"] == 6 and pts.counts()["tumour"] == 4  # a copy, original kept
    assert relabelled.purity() == pytest.approx(6 / 9)
    assert pts.with_labels(np.arange(10) < 4, "n").purity() == 0.0
    sub = pts.subset(pts.label == T)
    assert len(sub) == 4 and sub.purity() == 1.0 and sub.xy_um().shape == (4, 2)
    both = NucleusPoints.concat(sub, pts.subset([8]))
    assert len(both) == 5 and both.label.tolist() == [T, T, T, T, U]
    assert len(NucleusPoints.concat()) == 0
    probs = pts.with_probabilities(np.full(10, 0.25))
    assert probs.predicted_purity() == pytest.approx(0.25) and probs.probability.dtype == np.float32
    table = NucleusTable(x_um=[1.0, 2.0], y_um=[3.0, 4.0], area_um2=[20.0, 30.0], hematoxylin=[0.1, 0.2],
                         eccentricity=[0.3, 0.4])  # fmt: skip
    det = NucleusPoints.from_table(table)
    assert det.source.tolist() == [0, 0] and det.area_um2.tolist() == [20.0, 30.0]
    assert np.isnan(det.probability).all() and det.counts()["unlabeled"] == 2
    assert NucleusPoints.from_table(table, source="manual").source.tolist() == [1, 1]
    named = NucleusPoints([1.0, 2.0], [3.0, 4.0], label=["Tumor", "stroma"], source=["manual", "detected"])
    assert named.label.tolist() == [T, N] and named.source.tolist() == [1, 0]
    with pytest.raises(ValueError, match="unknown nucleus label 'xx'"):
        NucleusPoints([1.0], [2.0], label=["xx"])
    with pytest.raises(ValueError, match="equal lengths"):
        NucleusPoints(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="label codes"):
        NucleusPoints(np.zeros(1), np.zeros(1), label=[9])
    with pytest.raises(ValueError, match="boolean mask"):
        pts.subset(np.ones(3, bool))


def test_points_in_polygons_honours_holes_and_order() -> None:
    ring = _square(0, 0, 100)
    hole = _square(40, 40, 20)
    polygons = [[ring, hole], [_square(45, 45, 10)], [_square(90, 90, 50)]]
    xy = np.array([[10, 10], [50, 50], [95, 95], [120, 120], [-5, 5], [55, 20]], float)
    assert points_in_polygons(xy, polygons).tolist() == [0, 1, 0, 2, -1, 0]
    assert points_in_polygons(np.zeros((0, 2)), polygons).shape == (0,)
    assert points_in_polygons(xy, []).tolist() == [-1] * 6
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        points_in_polygons(np.zeros((3, 3)), polygons)


def test_points_in_polygons_matches_a_raster_on_many_points() -> None:
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 100, (20_000, 2))
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    polygons = [
        [np.c_[30 + 20 * np.cos(t), 30 + 20 * np.sin(t)], np.c_[30 + 8 * np.cos(t), 30 + 8 * np.sin(t)]],
        [np.c_[65 + 25 * np.cos(t), 60 + 25 * np.sin(t)]],
    ]
    idx = points_in_polygons(xy, polygons)
    d0 = np.hypot(xy[:, 0] - 30, xy[:, 1] - 30)
    d1 = np.hypot(xy[:, 0] - 65, xy[:, 1] - 60)
    expected = np.where((d0 < 20) & (d0 > 8), 0, np.where(d1 < 25, 1, -1))
    sure = (np.abs(d0 - 20) > 0.2) & (np.abs(d0 - 8) > 0.2) & (np.abs(d1 - 25) > 0.2)  # away from edges
    assert np.array_equal(idx[sure], expected[sure])


def test_region_summaries_with_a_hole_and_overlap() -> None:
    pts = _table()  # all at y = 50, x = 5, 15, ..., 95
    with_hole = [_square(0, 0, 100), _square(30, 30, 40)]  # hole holds x = 35, 45, 55, 65
    left = [_square(0, 40, 30)]  # x = 5, 15, 25 (tumour, classified 0.9, 0.8, NaN)
    empty = [_square(200, 200, 10)]
    s = region_summaries(pts, [with_hole, left, empty], names=["ring", "left", "nothing"])
    assert [r.name for r in s] == ["ring", "left", "nothing"]
    ring = s[0]
    # inside: x = 5, 15, 25 (T), 75 (OTH), 85, 95 (U)
    assert ring.n == 6 and ring.counts == {"unlabeled": 2, "tumour": 3, "normal": 0, "other": 1}
    assert ring.purity == 1.0
    assert ring.predicted_purity == pytest.approx((0.9 + 0.8 + 0.5) / 3, abs=1e-7)
    assert ring.difference == pytest.approx(ring.predicted_purity - 1.0)
    assert ring.area_um2 == pytest.approx(100 * 100 - 40 * 40)
    assert s[1].n == 3 and s[1].purity == 1.0 and s[1].predicted_purity == pytest.approx(0.85, abs=1e-7)
    assert s[2].n == 0 and s[2].purity is None and s[2].predicted_purity is None and s[2].difference is None
    assert region_summaries(pts, [left])[0].name == "region 1"
    with pytest.raises(ValueError, match="one name per region"):
        region_summaries(pts, [left], names=["a", "b"])


def _assert_same(a: NucleusPoints, b: NucleusPoints) -> None:
    for name in ("x_um", "y_um", "label", "probability", "area_um2", "source"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert getattr(a, name).dtype == getattr(b, name).dtype, name


def test_csv_round_trip_is_exact(tmp_path: Path) -> None:
    pts = _table()
    pts = NucleusPoints.concat(pts, NucleusPoints([1 / 3], [2 / 3], probability=[1 / 3], area_um2=[0.1]))
    path = tmp_path / "nuclei.csv"
    write_csv(pts, path)
    lines = path.read_text().splitlines()
    assert lines[0] == "x_um,y_um,label,probability,area_um2,source"
    assert lines[1] == "5.0,50.0,tumour,0.9,30.5,detected"
    assert lines[3] == "25.0,50.0,tumour,,,manual"  # NaN written empty
    _assert_same(read_csv(path), pts)
    empty = tmp_path / "empty.csv"
    write_csv(NucleusPoints.empty(), empty)
    assert len(read_csv(empty)) == 0


def test_read_csv_understands_detector_synthetic_and_pixel_files(tmp_path: Path) -> None:
    det = tmp_path / "det.csv"
    NucleusTable(x_um=[1.5, 2.5], y_um=[3.0, 4.0], area_um2=[20, 30], hematoxylin=[0.1, 0.2],
                 eccentricity=[0.3, 0.4]).to_csv(det)  # fmt: skip
    got = read_csv(det)
    assert got.x_um.tolist() == [1.5, 2.5] and got.area_um2.tolist() == [20, 30]
    assert got.source.tolist() == [SOURCES.index("detected")] * 2 and got.counts()["unlabeled"] == 2
    synth = tmp_path / "slide.nuclei.csv"
    synth.write_text("x_um,y_um,label,radius_um,kind\n1,2,normal,2.7,fibroblast\n3,4,tumour,5.1,tumour\n")
    got = read_csv(synth)
    assert got.label.tolist() == [N, T] and got.source.tolist() == [SOURCES.index("imported")] * 2
    kind_only = tmp_path / "kinds.csv"
    kind_only.write_text("x_um,y_um,kind\n1,2,lymphocyte\n3,4,tumour\n5,6,epithelial\n")
    assert read_csv(kind_only).label.tolist() == [N, T, N]
    px = tmp_path / "px.csv"
    px.write_text("X,Y,Class\n100,200,Tumor\n10,20,Stroma\n")
    got = read_csv(px, mpp=0.25)
    assert got.x_um.tolist() == [25.0, 2.5] and got.y_um.tolist() == [50.0, 5.0]
    assert got.label.tolist() == [T, N]
    with pytest.raises(NucleusFileError, match="um/px"):
        read_csv(px)


@pytest.mark.parametrize(
    ("text", "match"),
    [("", "empty"), ("a,b\n1,2\n", "x_um,y_um"), ("x_um,y_um\n1,oops\n", "row 2"),
     ("x_um,y_um,label\n1,2,banana\n", "banana"), ("x_um,y_um\n1,\n", "centroid")],
)  # fmt: skip
def test_read_csv_errors_name_the_file_and_the_fault(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(NucleusFileError, match=match) as info:
        read_csv(path)
    assert "bad.csv" in str(info.value)


def test_geojson_round_trip_in_pixels(tmp_path: Path) -> None:
    pts = _table()
    pts = NucleusPoints.concat(pts, NucleusPoints([1234.5678901], [0.1], label=[T], source=[1]))
    obj = to_geojson(pts, 0.25)
    assert obj["type"] == "FeatureCollection" and len(obj["features"]) == len(pts)
    first = obj["features"][0]
    assert first["geometry"] == {"type": "Point", "coordinates": [20.0, 200.0]}  # um / 0.25 = px
    props = first["properties"]
    assert props["objectType"] == "annotation"
    assert props["classification"] == {"name": "Tumor", "color": list(LABEL_COLOURS["tumour"])}
    assert props["measurements"] == {"probability": 0.9, "area_um2": 30.5}
    assert (props["label"], props["source"]) == ("tumour", "detected")
    unlabeled = obj["features"][8]["properties"]
    assert "classification" not in unlabeled and unlabeled["label"] == "unlabeled"
    assert "measurements" not in obj["features"][2]["properties"]  # NaN probability and area left out
    path = tmp_path / "nuclei.geojson"
    write_geojson(pts, path, 0.25)
    back = read_geojson(path, 0.25)
    np.testing.assert_allclose(back.x_um, pts.x_um, rtol=0, atol=1e-9)
    np.testing.assert_allclose(back.y_um, pts.y_um, rtol=0, atol=1e-9)
    for name in ("label", "probability", "area_um2", "source"):
        np.testing.assert_array_equal(getattr(back, name), getattr(pts, name), err_msg=name)
    assert to_geojson(pts, 0.25, object_type="detection")["features"][0]["properties"]["objectType"] == (
        "detection"
    )


def test_reads_a_qupath_style_file_with_multipoints(tmp_path: Path) -> None:
    qupath = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "id": "7a3e1f4c-0000-4000-8000-000000000001",
             "geometry": {"type": "MultiPoint", "coordinates": [[100, 200], [300.5, 400]]},
             "properties": {"objectType": "annotation",
                            "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [40, 80]},
             "properties": {"objectType": "annotation", "classification": {"name": "stroma"},
                            "measurements": [{"name": "probability", "value": 0.25}]}},
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]},
             "properties": {"objectType": "annotation"}},
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 6]},
             "properties": {"classification": {"name": "Positive", "color": [1, 2, 3]}}},
            {"type": "Feature",
             "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]},
             "properties": {"objectType": "annotation", "classification": {"name": "Region*"}}},
        ],
    }  # fmt: skip
    with pytest.warns(UserWarning) as record:
        pts = from_geojson(qupath, mpp=0.5)
    messages = " ".join(str(w.message) for w in record)
    assert "1 Polygon" in messages and "'Positive'" in messages
    assert pts.x_um.tolist() == [50.0, 150.25, 20.0, 0.5, 2.5]
    assert pts.y_um.tolist() == [100.0, 200.0, 40.0, 1.0, 3.0]
    assert pts.label.tolist() == [T, T, N, U, OTH]
    assert pts.source.tolist() == [SOURCES.index("imported")] * 5
    assert pts.probability[2] == np.float32(0.25) and np.isnan(pts.probability[[0, 1, 3, 4]]).all()
    # a bare list of features and an anisotropic um/px work too
    bare = from_geojson(qupath["features"][:1], mpp=(0.5, 0.25))
    assert bare.y_um.tolist() == [50.0, 100.0]
    path = tmp_path / "outlines.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": qupath["features"][4:]}))
    with pytest.raises(NucleusFileError, match="no Point or MultiPoint"):
        read_geojson(path, 0.5)
    path.write_text("{not json")
    with pytest.raises(NucleusFileError, match=r"outlines\.geojson"):
        read_geojson(path, 0.5)
    with pytest.raises(ValueError, match="mpp"):
        to_geojson(_table(), 0.0)
    assert len(from_geojson({"type": "FeatureCollection", "features": []}, 0.5)) == 0


def test_sidecar_path_beside_the_slide_or_in_a_folder(tmp_path: Path, monkeypatch) -> None:
    slide = tmp_path / "case 1.svs"
    assert sidecar_path(slide) == tmp_path / "case 1.svs.nuclei.csv"
    out = tmp_path / "results" / "nested"
    assert sidecar_path(slide, out) == out / "case 1.svs.nuclei.csv" and out.is_dir()
    fallback = tmp_path / "user-data"
    monkeypatch.setattr(autosave_module.os, "access", lambda *a, **k: False)
    monkeypatch.setenv("NAPARI_PATHOLOGY_DATA", str(fallback))
    kept = sidecar_path(slide)  # named after the slide and a digest of its full path
    assert kept.parent == fallback / "nuclei" and kept.name.startswith("case 1.svs.")
    assert kept.name.endswith(".nuclei.csv") and kept != fallback / "nuclei" / "case 1.svs.nuclei.csv"


def test_autosave_survives_a_crash_mid_write(tmp_path: Path, monkeypatch) -> None:
    path = sidecar_path(tmp_path / "slide.tif")
    assert load_sidecar(path) is None
    first = _table()
    save_atomic(first, path)
    before = path.read_bytes()
    _assert_same(load_sidecar(path), first)
    bigger = NucleusPoints.concat(first, first, first)

    buffer = __import__("io").StringIO()
    write_csv(bigger, buffer)

    def crash_half_way(fh, points: NucleusPoints, comment=None) -> None:
        fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as m:
        m.setattr(autosave_module, "_write_rows", crash_half_way)
        with pytest.raises(OSError, match="simulated"):
            save_atomic(bigger, path)
    assert path.read_bytes() == before
    _assert_same(load_sidecar(path), first)

    def no_replace(src, dst) -> None:
        raise OSError("power cut before rename (simulated)")

    with monkeypatch.context() as m:
        m.setattr(autosave_module.os, "replace", no_replace)
        with pytest.raises(OSError, match="power cut"):
            save_atomic(bigger, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind
    save_atomic(bigger, path)
    _assert_same(load_sidecar(path), bigger)


def test_corrupt_sidecar_is_a_clear_error_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "slide.tif.nuclei.csv"
    path.write_text("x_um,y_um,label\n1.0,2.0,tumour\n3.0,4")  # truncated last row
    with pytest.raises(NucleusFileError, match="corrupt") as info:
        load_sidecar(path)
    assert str(path) in str(info.value) and "left untouched" in str(info.value)
    assert path.read_text().endswith("3.0,4")
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(NucleusFileError, match=r"slide\.tif\.nuclei\.csv"):
        load_sidecar(path)
    assert path.exists() and os.path.getsize(path) > 0
