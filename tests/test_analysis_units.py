"""Engine pieces that need no model: NMS, aggregation, result folders (no Qt)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_pathology.analysis import (
    AnalysisResult,
    aggregate,
    load_result,
    non_maximum_suppression,
    save_result,
)


def test_nms_reports_maxima_and_suppresses_their_neighbourhood() -> None:
    heatmap = np.zeros((20, 20), np.float32)
    heatmap[5, 5], heatmap[5, 7], heatmap[15, 15], heatmap[5, 12] = 0.95, 0.9, 0.8, 0.4
    heatmap[0, 0] = np.nan
    found = non_maximum_suppression(heatmap, threshold=0.5, radius=3)
    assert found.tolist() == [[5.0, 5.0, pytest.approx(0.95)], [15.0, 15.0, pytest.approx(0.8)]]
    # a smaller radius keeps the close second peak
    assert len(non_maximum_suppression(heatmap, threshold=0.5, radius=1)) == 3
    assert non_maximum_suppression(np.full((4, 4), np.nan)).shape == (0, 3)


def test_aggregators() -> None:
    classes = ["normal", "tumour"]
    tumour = np.array([[0.9, 0.2], [np.nan, 0.6]], np.float32)
    stack = np.stack([1 - tumour, tumour])
    score, scores = aggregate(tumour, stack, "max", classes)
    assert score == pytest.approx(0.9) and scores["tumour"] == pytest.approx(0.9)
    score, _ = aggregate(tumour, stack, "mean", classes)
    assert score == pytest.approx((0.9 + 0.2 + 0.6) / 3)
    _, scores = aggregate(tumour, stack, "fraction", classes)
    assert scores == {"normal": pytest.approx(1 / 3), "tumour": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="slide-level head"):
        aggregate(tumour, stack, "attention", classes)


def make_result(partial: bool = False) -> AnalysisResult:
    heatmap = np.array([[0.1, np.nan], [0.7, 0.9]], np.float32)
    return AnalysisResult(
        slide_path="/data/s.tif", slide_name="s.tif", spec={"name": "m", "aggregator": "max"},
        heatmap=heatmap, class_heatmaps=np.stack([1 - heatmap, heatmap]), cell_um=32.0,
        first_centre_um=(16.0, 16.0), slide_mpp=(0.5, 0.5),
        detections=np.array([[48.0, 48.0, 0.9]]), slide_score=0.9,
        scores={"normal": 0.9, "tumour": 0.9}, partial=partial, tiles_done=3, tiles_total=3, key="k1",
    )  # fmt: skip


def test_result_round_trip_and_atomic_replace(tmp_path) -> None:
    out = tmp_path / "s" / "m"
    save_result(make_result(), out)
    assert sorted(p.name for p in out.iterdir()) == [
        "class_heatmaps.zarr", "detections.csv", "detections.geojson", "heatmap.zarr", "result.json",
    ]  # fmt: skip
    loaded = load_result(out)
    np.testing.assert_array_equal(loaded.heatmap, make_result().heatmap)
    assert loaded.detections.tolist() == [[48.0, 48.0, 0.9]]
    assert (loaded.slide_score, loaded.key, loaded.partial) == (0.9, "k1", False)
    assert (out / "detections.csv").read_text().splitlines()[0] == "x_um,y_um,score"
    save_result(make_result(partial=True), out)  # replaces in place, leaves no staging folders
    assert load_result(out).partial
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["m"]


def test_load_result_rejects_other_folders(tmp_path) -> None:
    with pytest.raises(ValueError, match="not a result folder"):
        load_result(tmp_path)
