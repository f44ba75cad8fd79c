"""Tumour type B of the synthetic slides: different from A, recorded in the truth, chosen per slide."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from napari_pathology.cli import main
from napari_pathology.cohort import read_slide_table
from napari_pathology.slide import synthetic
from napari_pathology.slide.synthetic import (
    BINARY_LABELS,
    SUBTYPE_LABELS,
    TUMOUR_KINDS,
    load_truth,
    slide_label,
    write_subtype_cohort,
    write_synthetic_slide,
)
from napari_pathology.slide.synthetic.fields import _F_TUMOUR
from napari_pathology.slide.synthetic.render import _render_block, _upsample

TILE = 256  # a CNN tile at 0.5 um/px


def tumour_tile_stats(seed: int, tumour_type: str) -> dict[str, float]:
    """Nuclear size and density of the tumour, and colour of a 256 px tile at its deepest point."""
    scene = synthetic._build_scene(1024, 1024, 0.5, seed, False, "macro", False, False, tumour_type)
    field = scene.fields[_F_TUMOUR]
    i, j = np.unravel_index(np.argmax(field), field.shape)
    r0, c0 = (int(np.clip((k + 0.5) * scene.grid.d - TILE // 2, 0, 1024 - TILE)) for k in (i, j))
    rgb = _render_block(scene, r0, r0 + TILE, c0, c0 + TILE).astype(float)
    (depth,) = _upsample(scene, [_F_TUMOUR], r0, r0 + TILE, c0, c0 + TILE)
    pixels = rgb[depth > 5.0]
    assert len(pixels) > 0.3 * TILE * TILE
    kinds = np.asarray(synthetic.NUCLEUS_KINDS)[scene.nuclei.kind]
    tumour = np.isin(kinds, TUMOUR_KINDS)
    assert set(kinds[tumour]) == {"tumour" if tumour_type == "A" else "tumour_b"}
    area_mm2 = float((field > 0).sum()) * scene.grid.step_um**2 / 1e6
    grey = pixels.mean(axis=1)
    return {
        "nuclear_area_um2": float(np.mean(np.pi * scene.nuclei.r_um[tumour] ** 2)),
        "nuclei_per_mm2": float(tumour.sum() / area_mm2),
        "dark_fraction": float((grey < 150).mean()),  # hematoxylin-dense pixels
        "brightness": float(grey.mean()),
        "red_minus_blue": float((pixels[:, 0] - pixels[:, 2]).mean()),  # eosin over hematoxylin
    }


@pytest.mark.slow
def test_type_b_is_measurably_different_from_type_a() -> None:
    seeds = (0, 1, 2)
    a = [tumour_tile_stats(s, "A") for s in seeds]
    b = [tumour_tile_stats(s, "B") for s in seeds]
    # No overlap over the seeds: larger nuclei, half the density, paler (vesicular) tiles.
    assert min(x["nuclear_area_um2"] for x in b) > 1.4 * max(x["nuclear_area_um2"] for x in a)
    assert max(x["nuclei_per_mm2"] for x in b) < 0.65 * min(x["nuclei_per_mm2"] for x in a)
    assert max(x["dark_fraction"] for x in b) < min(x["dark_fraction"] for x in a) - 0.1
    assert min(x["brightness"] for x in b) > max(x["brightness"] for x in a) + 5
    # More eosinophilic than type A on the same slide (stains vary between slides).
    for xa, xb in zip(a, b, strict=True):
        assert xb["red_minus_blue"] > xa["red_minus_blue"] + 8


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_truth_records_the_type_and_only_the_tumour_changes(tmp_path: Path) -> None:
    a = write_synthetic_slide(tmp_path / "a.tif", 1024, 5, tumour_size="micro")
    b = write_synthetic_slide(tmp_path / "b.tif", 1024, 5, tumour_size="micro", tumour_type="b")
    ta, tb = load_truth(a.slide_path), load_truth(b.slide_path)
    assert (a.tumour_type, ta["tumour_type"], ta["options"]["tumour_type"]) == ("A", "A", "A")
    assert (b.tumour_type, tb["tumour_type"], tb["options"]["tumour_type"]) == ("B", "B", "B")
    assert tb["lesions"] and all(lesion["tumour_type"] == "B" for lesion in tb["lesions"])
    assert tb["label"] == b.label == "tumour"
    assert (slide_label(ta), slide_label(b.slide_path), slide_label(tb, subtypes=False)) == (
        "tumour_a",
        "tumour_b",
        "tumour",
    )
    # Type B nuclei have their own kind and count as tumour (label and purity).
    rows = read_rows(b.nuclei_csv)
    kinds = {r["kind"] for r in rows if r["label"] == "tumour"}
    assert kinds == {"tumour_b"} and "tumour" not in {r["kind"] for r in rows}
    assert tb["n_tumour_nuclei"] == tb["n_nuclei_by_kind"]["tumour_b"] > 20
    assert ta["n_nuclei_by_kind"]["tumour_b"] == 0
    # Same seed: the same tissue, lesion outline and normal nuclei; only the tumour differs.
    for key in ("tissue_png", "tumour_png", "tumour_geojson"):
        assert getattr(a, key).read_bytes() == getattr(b, key).read_bytes(), key
    normal_a = [r for r in read_rows(a.nuclei_csv) if r["label"] == "normal"]
    assert normal_a == [r for r in rows if r["label"] == "normal"]


def test_bad_tumour_types_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tumour_type must be one of A, B, got 'C'"):
        write_synthetic_slide(tmp_path / "x.tif", 1024, tumour_type="C")
    with pytest.raises(ValueError, match=r"normal .* no tumour type"):
        write_synthetic_slide(tmp_path / "x.tif", 1024, negative=True, tumour_type="A")
    assert not list(tmp_path.iterdir())
    normal = write_synthetic_slide(tmp_path / "n.tif", 512, 1, negative=True)
    truth = load_truth(normal.slide_path)
    assert normal.tumour_type is None and truth["tumour_type"] is None
    assert slide_label(truth) == slide_label(truth, subtypes=False) == "normal"
    legacy = load_truth(write_synthetic_slide(tmp_path / "t.tif", 512, 1).slide_path)
    del legacy["tumour_type"]  # truth written before tumour types: type A
    assert slide_label(legacy) == "tumour_a"
    with pytest.raises(ValueError, match="label 'maybe'"):
        slide_label({"label": "maybe"})
    with pytest.raises(ValueError, match="tumour_type 'Z'"):
        slide_label({"label": "tumour", "tumour_type": "Z"})


def test_cli_tumour_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.tif"
    assert main(["synth", str(out), "--size", "1024", "--seed", "2", "--tumour-type", "b", "--quiet"]) == 0
    assert "label tumour (type B)" in capsys.readouterr().out
    assert load_truth(out)["tumour_type"] == "B"
    assert main(["synth", str(tmp_path / "c.tif"), "--size", "1024", "--tumour-type", "C"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--tumour-type: must be A or B, got 'C'" in err
    assert main(["synth", str(tmp_path / "n.tif"), "--size", "1024", "--negative", "--tumour-type", "A"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "a --negative slide has none" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in synthetic.truth_paths(out).values()
    )


def test_subtype_cohort_writes_each_class_and_a_slide_table(tmp_path: Path) -> None:
    table = write_subtype_cohort(tmp_path / "cohort", 1, seed=4, size=768)
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == list(SUBTYPE_LABELS)
    entries = read_slide_table(table, classes=SUBTYPE_LABELS)
    assert [e.label for e in entries] == list(SUBTYPE_LABELS)
    types = [load_truth(e.path)["tumour_type"] for e in entries]
    assert types == [None, "A", "B"]
    assert len({load_truth(e.path)["seed"] for e in entries}) == 3
    assert json.loads(entries[0].annotations.read_text())["features"] == []
    # Rerun: nothing is rewritten; binary labels on request.
    stamps = [e.path.stat().st_mtime_ns for e in entries]
    table = write_subtype_cohort(tmp_path / "cohort", 1, seed=4, size=768, subtypes=False)
    assert [e.label for e in read_slide_table(table)] == ["normal", "tumour", "tumour"]
    assert set(BINARY_LABELS) == {"normal", "tumour"}
    assert [e.path.stat().st_mtime_ns for e in entries] == stamps
    with pytest.raises(ValueError, match="n_per_class"):
        write_subtype_cohort(tmp_path / "x", 0)
