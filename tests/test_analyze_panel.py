"""Analyze panel: click Run on a synthetic slide, get heatmap + detections; Cancel mid-run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_pathology._widgets.analyze_panel import AnalyzePanel
from napari_pathology.analysis import HeatmapBlock
from napari_pathology.geometry import geojson_to_polygons, rasterize_polygons

PLUGIN = "napari-pathology"
MODEL = "nuclear-density"


@pytest.fixture
def panel_on_slide(make_napari_viewer, qtbot, synthetic_slide, tmp_path):
    viewer = make_napari_viewer()
    [slide_layer] = viewer.open(str(synthetic_slide.slide_path), plugin=PLUGIN)
    panel = AnalyzePanel(viewer)
    qtbot.addWidget(panel)
    panel.select_model(MODEL)
    panel.out_edit.setText(str(tmp_path))
    return viewer, panel, slide_layer


def test_run_shows_heatmap_detections_and_slide_score(panel_on_slide, qtbot, synthetic_slide) -> None:
    viewer, panel, slide_layer = panel_on_slide
    panel.run_button.click()
    assert not panel.run_button.isEnabled()
    qtbot.waitUntil(lambda: panel.run_button.isEnabled(), timeout=120_000)
    heatmap = viewer.layers[f"{slide_layer.name} {MODEL} heatmap"]
    points = viewer.layers[f"{slide_layer.name} {MODEL} detections"]
    assert tuple(heatmap.contrast_limits) == (0.0, 1.0) and heatmap.opacity == 0.5
    cell_um = heatmap.scale[0]
    assert cell_um == pytest.approx(128.0)  # 64 px at 2 um/px
    assert str(heatmap.units[0]) == "micrometer"
    assert "Slide score" in panel.score_label.text()
    # the hottest cell and the first detection lie on the planted tumour
    truth = synthetic_slide
    polygons = geojson_to_polygons(json.loads(truth.tumour_geojson.read_text()))
    tumour = rasterize_polygons(polygons, (truth.height, truth.width))
    data = np.nan_to_num(heatmap.data)
    r, c = np.unravel_index(np.argmax(data), data.shape)
    world = np.array(heatmap.data_to_world((r, c)))
    y, x = (world / slide_layer.scale).astype(int)
    assert tumour[y, x]
    assert len(points.data) >= 1
    py, px = (points.data[0] / slide_layer.scale).astype(int)
    assert tumour[py, px]
    assert "complete" in panel.status.text()


def test_cancel_mid_run_keeps_a_partial_heatmap(panel_on_slide, qtbot) -> None:
    viewer, panel, slide_layer = panel_on_slide
    panel.batch_spin.setValue(1)
    panel.run_button.click()
    panel.worker.yielded.connect(
        lambda event: panel.cancel() if isinstance(event.payload, HeatmapBlock) else None
    )
    qtbot.waitUntil(lambda: panel.run_button.isEnabled(), timeout=120_000)
    assert "partial" in panel.status.text()
    heatmap = viewer.layers[f"{slide_layer.name} {MODEL} heatmap"]
    assert 0 < np.isfinite(heatmap.data).sum() < heatmap.data.size


def test_run_refuses_a_slide_without_mpp(make_napari_viewer, qtbot, monkeypatch) -> None:
    from conftest import real_file

    messages = []
    monkeypatch.setattr("napari.utils.notifications.show_error", messages.append)
    viewer = make_napari_viewer()
    viewer.open(str(real_file("slides/boxes.tiff")), plugin=PLUGIN)
    panel = AnalyzePanel(viewer)
    qtbot.addWidget(panel)
    panel.run_button.click()
    assert panel.worker is None
    assert any("Slide panel" in m for m in messages)


def test_shipped_metastasis_model_finds_the_tumour_from_the_panel(
    panel_on_slide, qtbot, synthetic_slide
) -> None:
    viewer, panel, slide_layer = panel_on_slide
    panel.select_model("metastasis")
    texts = [panel.model_combo.itemText(i) for i in range(panel.model_combo.count())]
    first_untrained = next(i for i, t in enumerate(texts) if "untrained" in t)
    assert panel.model_combo.currentIndex() < first_untrained  # trained models are listed first
    assert panel.model_combo.currentText() == "metastasis (synthetic demo)"  # marked in the list
    assert "not for diagnostic use" in panel.model_info.text()
    assert panel.tta_check.isChecked()  # Liu et al.: 8 orientations by default
    panel.run_button.click()
    qtbot.waitUntil(lambda: panel.run_button.isEnabled(), timeout=180_000)
    heatmap = viewer.layers[f"{slide_layer.name} metastasis heatmap"]
    assert heatmap.scale[0] == pytest.approx(128.0)  # stride 128 px at 1 um/px
    truth = synthetic_slide
    tumour = rasterize_polygons(
        geojson_to_polygons(json.loads(truth.tumour_geojson.read_text())), (truth.height, truth.width)
    )
    data = np.nan_to_num(heatmap.data)
    r, c = np.unravel_index(np.argmax(data), data.shape)
    y, x = (np.array(heatmap.data_to_world((r, c))) / slide_layer.scale).astype(int)
    assert tumour[y, x]
    points = viewer.layers[f"{slide_layer.name} metastasis detections"]
    assert any(tumour[tuple((p / slide_layer.scale).astype(int))] for p in points.data)


def test_untrained_models_are_marked(panel_on_slide) -> None:
    _, panel, _ = panel_on_slide
    texts = [panel.model_combo.itemText(i) for i in range(panel.model_combo.count())]
    assert "metastasis-small-10x (untrained)" in texts
    assert not any(t.startswith("metastasis (") and "untrained" in t for t in texts)
    index = texts.index("metastasis-small-10x (untrained)")  # short names; family and details in a tooltip
    assert panel.model_combo.itemData(index, Qt.ItemDataRole.ToolTipRole).startswith("metastasis: ")
    panel.select_model("metastasis-small-10x")
    assert "Untrained" in panel.model_info.text()


def test_nucleus_purity_model_runs_through_the_engine(
    panel_on_slide, qtbot, synthetic_slide, tmp_path
) -> None:
    import csv

    from scipy.spatial import cKDTree

    from napari_pathology.analysis import load_result

    viewer, panel, slide_layer = panel_on_slide
    panel.select_model("nucleus-purity")
    panel.run_button.click()
    qtbot.waitUntil(lambda: panel.run_button.isEnabled(), timeout=180_000)
    points = panel._layers.points
    assert points is not None, panel.status.text()
    assert points.layer in viewer.layers and points.layer.name == f"{slide_layer.name} nucleus-purity nuclei"
    purity = viewer.layers[f"{slide_layer.name} nucleus-purity purity"]  # the heatmap, named by its kind
    assert tuple(purity.contrast_limits) == (0.0, 1.0) and purity.colormap.name == "coolwarm"
    assert f"{slide_layer.name} nucleus-purity detections" not in viewer.layers  # it has none

    [summary_file] = tmp_path.rglob("result.json")
    summary = json.loads(summary_file.read_text())
    result = load_result(summary_file.parent)  # saved as every result is: digests checked on load
    nuclei = result.points
    assert summary["n_points"] == len(nuclei) > 1000 and not summary["partial"]
    assert summary["heatmap_kind"] == "purity" and result.unit == "nuclei"
    assert np.isfinite(nuclei.probability).all()
    # The purity the classifier should see: true kinds of the nuclei the detector found.
    with open(synthetic_slide.nuclei_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    xy_true = np.array([[float(r["x_um"]), float(r["y_um"])] for r in rows])
    tumour_true = np.array([r["kind"] == "tumour" for r in rows])
    distance, nearest = cKDTree(xy_true).query(nuclei.xy_um())
    matched = distance < 3.0
    true_purity = tumour_true[nearest[matched]].mean()
    assert nuclei.probability[matched].mean() == pytest.approx(true_purity, abs=0.1)
    # the slide score counts every detection, matched or not
    assert summary["slide_score"] == pytest.approx(float(nuclei.probability.mean()), abs=1e-6)
    assert "Predicted purity" in panel.score_label.text()
    assert f"{len(nuclei)} nuclei" in panel.status.text()


def test_resumed_run_shows_the_saved_partial_heatmap_at_once(panel_on_slide, qtbot) -> None:
    viewer, panel, slide_layer = panel_on_slide
    panel.batch_spin.setValue(2)
    painted = panel._on_progress
    shown: list[int] = []
    stop_after = [3]

    def watch(event) -> None:  # the panel's own slot, then what it shows (wired before the worker starts)
        painted(event)
        if isinstance(event.payload, HeatmapBlock):
            shown.append(int(np.isfinite(panel._heatmap_layer.data).sum()))
            if len(shown) == stop_after[0]:
                panel.cancel()

    panel._on_progress = watch
    panel.run_button.click()
    qtbot.waitUntil(lambda: panel.run_button.isEnabled(), timeout=120_000)
    heatmap = viewer.layers[f"{slide_layer.name} {MODEL} heatmap"]
    saved = int(np.isfinite(heatmap.data).sum())
    assert "partial" in panel.status.text() and 0 < saved < heatmap.data.size
    assert shown[0] == 2

    shown.clear()
    stop_after[0] = 1
    panel.run_button.click()
    qtbot.waitUntil(lambda: panel.run_button.isEnabled(), timeout=120_000)
    assert shown and shown[0] >= saved  # the kept tiles are on screen before any new tile
    assert np.isfinite(viewer.layers[f"{slide_layer.name} {MODEL} heatmap"].data).sum() >= saved


def test_refused_run_does_not_leave_the_previous_score(panel_on_slide, qtbot, tmp_path, monkeypatch) -> None:
    import tifffile

    viewer, panel, _slide_layer = panel_on_slide
    panel.run_button.click()
    qtbot.waitUntil(lambda: panel.run_button.isEnabled(), timeout=120_000)
    assert "Slide score" in panel.score_label.text()
    messages = []
    monkeypatch.setattr("napari.utils.notifications.show_error", messages.append)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.full((256, 256, 3), 220, np.uint8), photometric="rgb")
    [other] = viewer.open(str(plain), plugin=PLUGIN)
    panel.slide_combo.setCurrentText(other.name)
    panel.run_button.click()
    assert panel.score_label.text() == ""
    assert "not started" in panel.status.text() and "Slide panel" in panel.status.text()
    assert any("Slide panel" in m for m in messages)


def test_a_stride_past_the_slide_is_named_not_called_no_tissue(panel_on_slide, qtbot, monkeypatch) -> None:
    messages = []
    monkeypatch.setattr("napari.utils.notifications.show_error", messages.append)
    viewer, panel, _slide_layer = panel_on_slide
    panel.stride_spin.setValue(4096)  # 4096 px at the model's 2 um/px: far past the 1.5 mm slide
    panel.run_button.click()
    qtbot.waitUntil(lambda: panel.run_button.isEnabled(), timeout=60_000)
    text = panel.status.text().lower()
    assert "stride" in text and "no tissue" not in text and any("stride" in m for m in messages)
    assert not [layer for layer in viewer.layers if "heatmap" in layer.name]


def test_a_result_with_an_attention_heatmap_and_points_shows_without_a_runner(panel_on_slide) -> None:
    """What a bag (CLAM) runner will return: shown by kind, with no change to the panel."""
    from napari_pathology.analysis import AnalysisResult
    from napari_pathology.nuclei.points import NucleusPoints

    viewer, panel, slide_layer = panel_on_slide
    rng = np.random.default_rng(0)
    attention = rng.normal(0.0, 2.0, (12, 12)).astype(np.float32)  # raw scores, not 0-1
    attention[0, 0] = np.nan
    mpp = (slide_layer.scale[1], slide_layer.scale[0])
    width_um, height_um = (
        float(slide_layer.metadata[k]) * m for k, m in (("width", mpp[0]), ("height", mpp[1]))
    )
    xy = rng.uniform(0, 1, (50, 2)) * (width_um, height_um)
    probability = np.linspace(0.0, 1.0, 50)
    result = AnalysisResult(
        slide_path=slide_layer.metadata["path"], slide_name=slide_layer.name,
        spec={"name": "toy-clam", "aggregator": "attention"}, heatmap=attention, class_heatmaps=None,
        cell_um=128.0, first_centre_um=(64.0, 64.0), slide_mpp=mpp,
        detections=np.array([[300.0, 400.0, 0.9], [800.0, 700.0, 0.7]]), slide_score=0.87,
        scores={"normal": 0.13, "tumour": 0.87}, partial=False, tiles_done=143, tiles_total=143,
        heatmap_kind="attention", points=NucleusPoints(x_um=xy[:, 0], y_um=xy[:, 1], probability=probability),
    )  # fmt: skip
    # while it runs: blocks of attention scores turn the growing layer into an attention layer
    from types import SimpleNamespace

    from napari_pathology._widgets.analyze_layers import ResultLayers
    from napari_pathology.progress import Progress

    panel._layers = ResultLayers(viewer, slide_layer, "toy-clam", tuple(slide_layer.scale))
    panel._layers.show_grid(SimpleNamespace(cell_um=128.0, first_centre_um=(64.0, 64.0), shape=(12, 12)))
    assert viewer.layers[f"{slide_layer.name} toy-clam heatmap"] is panel._heatmap_layer
    block = HeatmapBlock(np.array([[1, 1], [2, 3]]), np.array([-3.0, 5.0], np.float32), kind="attention")
    panel._on_progress(Progress(2, 143, "2/143 tiles", block))
    growing = viewer.layers[f"{slide_layer.name} toy-clam attention"]
    assert growing is panel._heatmap_layer and growing.colormap.name == "coolwarm"  # diverging
    assert tuple(growing.contrast_limits) == (-3.0, 5.0) and growing.data[2, 3] == 5.0

    panel.show_result(result)
    layer = viewer.layers[f"{slide_layer.name} toy-clam attention"]
    assert layer is growing  # filled in place
    assert layer.colormap.name == "coolwarm" and layer.scale[0] == pytest.approx(128.0)
    assert tuple(layer.contrast_limits) == (0.0, 100.0)  # CLAM's view: percentiles of the raw scores
    hottest = np.unravel_index(np.nanargmax(attention), attention.shape)
    assert layer.data[hottest] == pytest.approx(100.0) and np.isnan(layer.data[0, 0])
    assert panel.percentile_check.isVisibleTo(panel) and "percentile" in panel.legend.text()
    panel.percentile_check.setChecked(False)  # raw scores, the same layer
    assert viewer.layers[f"{slide_layer.name} toy-clam attention"] is layer
    np.testing.assert_array_equal(layer.data, attention)
    assert tuple(layer.contrast_limits) == pytest.approx((np.nanmin(attention), np.nanmax(attention)))
    assert "raw" in panel.legend.text()
    assert layer.metadata["heatmap_kind"] == "attention"
    assert not [name for name in viewer.layers if name.name.endswith(" heatmap")]
    detections = viewer.layers[f"{slide_layer.name} toy-clam detections"]
    assert detections.features["score"].tolist() == [0.9, 0.7] and len(detections.data) == 2
    nuclei = viewer.layers[f"{slide_layer.name} toy-clam nuclei"]
    assert len(nuclei.data) == 50  # all in view: drawn, coloured by tumour probability
    colours = np.asarray(nuclei.face_color)
    assert not np.allclose(colours[np.argmin(nuclei.features["probability"])], colours[-1])
    assert panel.score_label.text().startswith("Slide score (attention): 0.870<br>")
    assert "PARTIAL" not in panel.score_label.text() and "synthetic demo" not in panel.score_label.text()
    assert "complete: 143/143 tiles, 2 detections, 50 nuclei" in panel.status.text()

    # the nuclei follow the slide when its um/px changes, also when redrawn from their micrometres
    from napari_pathology._layers import follow_slide_scale

    def pixels() -> np.ndarray:
        return np.array([slide_layer.world_to_data(p) for p in nuclei.data])

    before = pixels()
    old_scale = tuple(slide_layer.scale)
    slide_layer.metadata = {**slide_layer.metadata, "mpp_x": 2 * mpp[0], "mpp_y": 2 * mpp[1]}
    slide_layer.scale = (2 * old_scale[0], 2 * old_scale[1])
    follow_slide_scale(viewer.layers, slide_layer, old_scale)
    np.testing.assert_allclose(pixels(), before, atol=1e-6)
    viewer.reset_view()  # the whole slide, twice as large now, in view
    panel._layers.points.shown = np.zeros(0, np.int64)  # forget what is drawn: drawn again
    panel._layers.points.update()
    assert len(nuclei.data) == 50
    np.testing.assert_allclose(pixels(), before, atol=1e-6)

    # the next result of the same slide and model replaces what the first one showed
    panel.show_result(
        dataclasses.replace(result, points=None, detections=np.zeros((0, 3)), heatmap_kind="activation")
    )
    names = [layer.name for layer in viewer.layers]
    assert f"{slide_layer.name} toy-clam activation map" in names
    assert not [n for n in names if n.endswith((" attention", " nuclei", " detections"))]
