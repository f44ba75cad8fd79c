"""One tumour/normal vocabulary: slide labels, drawn regions and nucleus labels read it; outputs unchanged."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from napari_pathology import vocabulary as words
from napari_pathology.cohort import NORMAL_LABELS, TUMOUR_LABELS, canonical_label
from napari_pathology.nuclei.points import (
    LABELS,
    QUPATH_CLASSES,
    NucleusPoints,
    parse_label,
    to_geojson,
    write_csv,
)
from napari_pathology.training.regions import REGION_LABELS, region_label, write_region_data


def test_every_reader_takes_its_words_from_the_vocabulary() -> None:
    assert (TUMOUR_LABELS, NORMAL_LABELS) == (words.SLIDE_TUMOUR_SPELLINGS, words.SLIDE_NORMAL_SPELLINGS)
    assert REGION_LABELS == (words.TUMOUR, words.NORMAL) and LABELS[1:3] == REGION_LABELS
    assert QUPATH_CLASSES is words.QUPATH_CLASSES
    for spelling in words.SLIDE_TUMOUR_SPELLINGS:
        assert canonical_label(spelling.upper()) == region_label(f" {spelling} ") == "tumour"
    for spelling in words.SLIDE_NORMAL_SPELLINGS:
        assert canonical_label(spelling) == region_label(spelling) == "normal"
    for label, spellings in words.NUCLEUS_SPELLINGS.items():
        assert {LABELS[parse_label(s.title())] for s in spellings} == {label}
    # slide labels accept digits, nucleus labels refuse them (a code or a class?)
    assert canonical_label("1") == "tumour"
    with pytest.raises(ValueError, match="ambiguous"):
        parse_label("1")


def test_region_and_nucleus_files_are_byte_identical_to_before(tmp_path: Path) -> None:
    ring = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    meta = {"path": "/data/s.tif", "mpp_x": 0.5, "mpp_source": "user"}
    write_region_data(tmp_path, "x", {"tumour": [[ring]], "normal": [[ring + 20]]}, meta)
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in tmp_path.iterdir()}
    assert (
        digests["x.tumour.geojson"] == "db9bffdc500a19f4"
        and digests["x.normal.geojson"] == "bc67e8e2e195d88d"
    )
    normal = json.loads((tmp_path / "x.normal.geojson").read_text())["features"][0]["properties"]
    assert normal["classification"] == {"name": "Normal", "color": [0, 160, 60]}

    points = NucleusPoints([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], label=np.arange(4, dtype=np.int8))
    names = [
        (f["properties"].get("classification") or {}).get("name") for f in to_geojson(points, 0.5)["features"]
    ]
    assert names == [None, "Tumor", "Normal", "Other"]
    text = io.StringIO()
    write_csv(points, text)
    assert text.getvalue().splitlines() == [
        "x_um,y_um,label,probability,area_um2,source",
        "1.0,5.0,unlabeled,,,detected",
        "2.0,6.0,tumour,,,detected",
        "3.0,7.0,normal,,,detected",
        "4.0,8.0,other,,,detected",
    ]
