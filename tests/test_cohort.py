"""Slide tables: what is refused (with the file and line named) and what is read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from napari_pathology.cohort import (
    CohortError,
    SlideEntry,
    canonical_label,
    read_slide_table,
    write_slide_table,
)

SQUARE = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]


def make_table(
    folder: Path, rows: list[str], header: str = "slide,label", slides=("a.tif", "b.tif", "c.tif")
) -> Path:
    for name in slides:
        (folder / name).write_bytes(b"")
    table = folder / "slides.csv"
    table.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return table


def geojson(folder: Path, name: str, coordinates, **extra) -> Path:
    path = folder / name
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": coordinates},
        "properties": {},
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [{**feature}], **extra}))
    return path


def test_labels_are_read_in_their_canonical_spelling(tmp_path) -> None:
    table = make_table(tmp_path, ["a.tif,Tumor", "b.tif,negative", "c.tif,"])
    entries = read_slide_table(table)
    assert [e.label for e in entries] == ["tumour", "normal", None]
    assert [e.is_tumour for e in entries] == [True, False, None]
    assert entries[0].source == "slides.csv, line 2"
    assert (canonical_label("1"), canonical_label("benign"), canonical_label("LUAD")) == (
        "tumour",
        "normal",
        None,
    )


def test_a_label_typo_is_refused_with_the_row_and_the_closest_label(tmp_path) -> None:
    table = make_table(tmp_path, ["a.tif,tumour", "b.tif,normal", "c.tif,tumuor"])
    with pytest.raises(
        CohortError, match=r"slides.csv, line 4: unknown label 'tumuor'; did you mean 'tumour'\?"
    ):
        read_slide_table(table)
    table = make_table(tmp_path, ["a.tif,tumour", "b.tif,nromal"])
    with pytest.raises(CohortError, match=r"line 3: .*did you mean 'normal'"):
        read_slide_table(table)


def test_other_classes_need_the_caller_to_name_them(tmp_path) -> None:
    table = make_table(tmp_path, ["a.tif,LUAD", "b.tif,lusc", "c.tif,Normal"])
    with pytest.raises(CohortError, match=r"unknown label 'LUAD'.*multi-class"):
        read_slide_table(table)
    entries = read_slide_table(table, classes=["normal", "LUAD", "LUSC"])
    assert [e.label for e in entries] == ["LUAD", "LUSC", "normal"]
    typo = make_table(tmp_path, ["a.tif,LUDA"])
    with pytest.raises(
        CohortError, match=r"line 2: unknown label 'LUDA'; did you mean 'LUAD'\? labels must be normal"
    ):
        read_slide_table(typo, classes=["normal", "LUAD", "LUSC"])
    spelled = make_table(tmp_path, ["a.tif,tumor", "b.tif,benign", "c.tif,tumuor"])
    with pytest.raises(CohortError, match=r"line 4: .*did you mean 'Tumor'\?"):
        read_slide_table(spelled, classes=["Normal", "Tumor", "LUAD"])
    plain = make_table(tmp_path, ["a.tif,tumour", "b.tif,benign"])
    assert [e.label for e in read_slide_table(plain, classes=["Normal", "Tumor"])] == ["Tumor", "Normal"]


def test_a_slide_listed_twice_is_refused_naming_the_rows(tmp_path) -> None:
    table = make_table(
        tmp_path, ["a.tif,tumour", "b.tif,normal", "./a.tif,tumour", f"{tmp_path / 'a.tif'},tumour"]
    )
    with pytest.raises(CohortError, match=r"slide a.tif is listed 3 times \(line 2, line 4, line 5\)"):
        read_slide_table(table)
    os.symlink(tmp_path / "b.tif", tmp_path / "link.tif")
    table = make_table(tmp_path, ["b.tif,normal", "link.tif,normal"])
    with pytest.raises(CohortError, match=r"listed 2 times \(line 2, line 3\)"):
        read_slide_table(table)


def test_a_table_that_is_not_utf8_is_refused_naming_the_file(tmp_path) -> None:
    (tmp_path / "a.tif").write_bytes(b"")
    table = tmp_path / "slides.csv"
    table.write_bytes("slide,label\na.tif,tumour,Ärzte\n".encode("latin-1"))
    with pytest.raises(CohortError, match=r"slide table .*slides.csv is not UTF-8 text"):
        read_slide_table(table)


def test_a_malformed_csv_row_is_refused_with_its_line(tmp_path) -> None:
    table = make_table(tmp_path, ["a.tif,tumour", "b.tif,normal," + "x" * 200_000])
    with pytest.raises(CohortError, match=r"slides.csv, line 3: not a readable CSV row"):
        read_slide_table(table)


@pytest.mark.parametrize("mpp", ["nan", "inf", "0", "-0.5", "1e9", "abc"])
def test_an_implausible_mpp_is_refused_with_its_line(tmp_path, mpp) -> None:
    table = make_table(tmp_path, ["a.tif,tumour,0.5", f"b.tif,normal,{mpp}"], header="slide,label,mpp")
    with pytest.raises(CohortError, match=r"line 3: mpp .* (not a plausible um/px|is not a number)"):
        read_slide_table(table)


@pytest.mark.parametrize(
    ("coordinates", "message"),
    [
        ([[[0, 0], [10, 0], [0, 0]]], "feature 0: a polygon needs at least 3 distinct points"),
        ([[[0, 0], [1e12, 0], [1e12, 1e12]]], "feature 0: coordinate 1e\\+12 is larger than 1e\\+07"),
        ([[[0, 0], ["x", 0], [1, 1]]], "feature 0: coordinates are not a list"),
    ],
    ids=["two-points", "huge", "not-numbers"],
)
def test_unusable_annotation_polygons_are_refused_with_the_row(tmp_path, coordinates, message) -> None:
    geojson(tmp_path, "a.geojson", coordinates)
    table = make_table(tmp_path, ["a.tif,tumour,a.geojson"], header="slide,label,annotations")
    with pytest.raises(CohortError, match=f"slides.csv, line 2: annotations .*a.geojson: {message}"):
        read_slide_table(table)


def test_nan_and_deeply_nested_annotations_are_refused_with_the_row(tmp_path) -> None:
    (tmp_path / "nan.geojson").write_text(
        '{"type": "Polygon", "coordinates": [[[0, 0], [NaN, NaN], [5, 5], [0, 5]]]}'
    )
    (tmp_path / "deep.geojson").write_text("[" * 100_000 + "]" * 100_000)
    for name, cause in (("nan.geojson", "NaN"), ("deep.geojson", "nested too deeply")):
        table = make_table(tmp_path, [f"a.tif,tumour,{name}"], header="slide,label,annotations")
        with pytest.raises(CohortError, match=f"line 2: annotations .*{name} .*{cause}"):
            read_slide_table(table)


def test_a_polygon_entirely_off_its_slide_is_refused_when_the_size_is_known(tmp_path) -> None:
    far = [[[5000, 5000], [5100, 5000], [5100, 5100], [5000, 5100]]]
    geojson(tmp_path, "px.geojson", far)
    geojson(tmp_path, "um.geojson", far, units="um")
    table = make_table(
        tmp_path, ["a.tif,tumour,px.geojson", "b.tif,tumour,um.geojson"], header="slide,label,annotations"
    )
    px, um = read_slide_table(table)  # the slide's size is not known here
    with pytest.raises(
        CohortError, match=r"slides.csv, line 2: .*px.geojson: feature 0: .*entirely outside the slide"
    ):
        px.tumour_polygons_um(0.5, slide_size=(1000, 1000))
    assert len(px.tumour_polygons_um(0.5, slide_size=(6000, 6000))) == 1
    with pytest.raises(CohortError, match=r"line 3: .*entirely outside"):
        um.tumour_polygons_um(0.5, slide_size=(1000, 1000))  # 500 x 500 um
    assert len(um.tumour_polygons_um(2.0, slide_size=(3000, 3000))) == 1  # 6000 x 6000 um


def test_polygons_in_pixels_are_scaled_and_the_table_round_trips(tmp_path) -> None:
    geojson(tmp_path, "a.geojson", [SQUARE])
    table = make_table(tmp_path, ["a.tif,tumour,a.geojson,0.25"], header="slide,label,annotations,mpp")
    [entry] = read_slide_table(table)
    [[ring]] = entry.tumour_polygons_um(0.5)
    assert ring.max() == 50.0
    out = write_slide_table([entry, SlideEntry(tmp_path / "b.tif", "normal")], tmp_path / "copy" / "t.csv")
    assert [e.label for e in read_slide_table(out)] == ["tumour", "normal"]
    assert [p.name for p in out.parent.iterdir()] == ["t.csv"]  # no temporary left behind
