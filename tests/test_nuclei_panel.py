"""Nuclei panel: detect in drawn regions, label with keys, live purity, autosave, files, classify, scale."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

# Import the model registry before any viewer exists (see test_close_viewer.py: triton vs OpenGL).
import napari_pathology.models  # noqa: F401  isort: skip
from qtpy.QtCore import Qt
from scipy.spatial import cKDTree

from napari_pathology._widgets.nuclei_layers import points_from_layer
from napari_pathology._widgets.nuclei_panel import NucleiPanel
from napari_pathology.nuclei.points import LABELS, NucleusPoints, load_sidecar, merge_detections, read_geojson
from test_train_panel import add_regions

PLUGIN = "napari-pathology"
WAIT_MS = 120_000


@pytest.fixture
def private_slide(synthetic_slide, tmp_path):
    """The synthetic slide copied to a private folder, so its autosave sidecar is this test's own."""
    path = tmp_path / "slide.tif"
    shutil.copy(synthetic_slide.slide_path, path)
    return path


def truth_nuclei(synthetic_slide) -> tuple[np.ndarray, np.ndarray]:
    """Every rendered nucleus ``(x_um, y_um)`` and whether it is a tumour nucleus."""
    with open(synthetic_slide.nuclei_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    xy = np.array([[float(r["x_um"]), float(r["y_um"])] for r in rows])
    return xy, np.array([r["kind"] == "tumour" for r in rows])


def open_panel(make_napari_viewer, path):
    viewer = make_napari_viewer()
    [slide_layer] = viewer.open(str(path), plugin=PLUGIN)
    _dock, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Nuclei")
    assert isinstance(panel, NucleiPanel)
    return viewer, slide_layer, panel


def detect_in_regions(panel, qtbot) -> object:
    panel.where_combo.setCurrentIndex(panel.where_combo.findData("regions"))
    panel.regions_combo.setCurrentText("regions")
    panel.detect_button.click()
    qtbot.waitUntil(lambda: panel.detect_button.isEnabled(), timeout=WAIT_MS)
    layer = panel.nuclei_layer()
    assert layer is not None, panel.status.text()
    return layer


def label_from_truth(panel, layer, synthetic_slide) -> np.ndarray:
    """Label every detected nucleus like the nearest true one (within 3 um); returns is-tumour per point."""
    xy_true, tumour_true = truth_nuclei(synthetic_slide)
    points = points_from_layer(layer, panel.mpp)
    distance, nearest = cKDTree(xy_true).query(points.xy_um())
    matched = distance < 3.0
    is_tumour = matched & tumour_true[nearest]
    layer.selected_data = set(np.flatnonzero(is_tumour).tolist())
    panel.label_selected("tumour")
    layer.selected_data = set(np.flatnonzero(matched & ~tumour_true[nearest]).tolist())
    panel.label_selected("normal")
    layer.selected_data = set()
    return is_tumour


def test_detect_label_keys_purity_and_autosave_restore(
    make_napari_viewer, qtbot, synthetic_slide, private_slide
):
    viewer, slide_layer, panel = open_panel(make_napari_viewer, private_slide)
    add_regions(viewer, slide_layer, synthetic_slide)
    layer = detect_in_regions(panel, qtbot)
    points = points_from_layer(layer, panel.mpp)
    assert len(points) > 100
    assert set(points.source_names()) == {"detected"}

    # The detections cover the true nuclei of the two regions.
    names, polygons = panel.regions()
    assert names == ["region 1", "region 2"]
    from napari_pathology.geometry import points_in_polygons
    from napari_pathology.nuclei.detect import detection_scores

    xy_true, tumour_true = truth_nuclei(synthetic_slide)
    inside_true = points_in_polygons(xy_true, polygons) >= 0
    scores = detection_scores(points.xy_um(), xy_true[inside_true], radius_um=3.0)
    # These regions are a tumour nest and dense normal tissue, where synthetic nuclei overlap:
    # about 0.63 precision and 0.54 recall at 3 um (see benchmarks/nuclei_detection.py).
    assert scores["precision"] >= 0.55 and scores["recall"] >= 0.45, scores

    # Key presses on the canvas label the selected nuclei.
    viewer.layers.selection.active = layer
    layer.mode = "select"
    layer.selected_data = {0, 1, 2}
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(canvas, Qt.Key.Key_T)
    assert list(layer.features["label"][:3]) == ["tumour"] * 3
    layer.selected_data = {3}
    qtbot.keyClick(canvas, Qt.Key.Key_N)
    layer.selected_data = {2}
    qtbot.keyClick(canvas, Qt.Key.Key_U)
    assert list(layer.features["label"][:4]) == ["tumour", "tumour", "unlabeled", "normal"]
    assert "2 tumour, 1 normal" in panel.counts_label.text()
    assert "Purity 0.67 (2/3)" in panel.counts_label.text()

    # Label everything from the truth: purity per region follows the truth.
    is_tumour = label_from_truth(panel, layer, synthetic_slide)
    panel.recount()
    summaries = {s.name: s for s in panel.summaries}
    true_region = points_in_polygons(xy_true, polygons)
    for k, name in enumerate(names):
        truth = tumour_true[true_region == k].mean()
        assert summaries[name].purity == pytest.approx(truth, abs=0.1), (name, truth)
    assert panel.region_table.rowCount() == 2
    assert summaries["region 1"].purity > 0.5 > summaries["region 2"].purity

    # Autosave lands beside the slide; a new session (as after a crash) restores it.
    sidecar = panel.autosave_path
    assert sidecar.parent == private_slide.parent
    qtbot.waitUntil(lambda: sidecar.exists() and "Autosaved" in panel.autosave_label.text(), timeout=10_000)
    saved = load_sidecar(sidecar)
    assert saved.counts()["tumour"] == int(is_tumour.sum())
    viewer.close()

    _viewer2, _slide_layer2, panel2 = open_panel(make_napari_viewer, private_slide)
    restored = panel2.nuclei_layer()
    assert restored is not None and len(restored.data) == len(points)
    assert panel2.current_points().counts() == saved.counts()
    assert "Restored" in panel2.status.text()


def test_export_import_and_redetect_keeps_labels(
    make_napari_viewer, qtbot, synthetic_slide, private_slide, tmp_path
):
    viewer, slide_layer, panel = open_panel(make_napari_viewer, private_slide)
    add_regions(viewer, slide_layer, synthetic_slide, labels=("normal",))
    layer = detect_in_regions(panel, qtbot)
    n = len(layer.data)
    layer.selected_data = {0, 1}
    panel.label_selected("tumour")
    before = panel.current_points()

    # A second Detect replaces unlabeled detections but keeps the labelled ones.
    panel.detect_button.click()
    qtbot.waitUntil(lambda: panel.detect_button.isEnabled(), timeout=WAIT_MS)
    again = panel.current_points()
    assert again.counts()["tumour"] == 2
    assert abs(len(again) - n) <= 2

    geojson = panel.export_annotations(tmp_path / "nuclei.geojson")
    csv_path = panel.export_annotations(tmp_path / "nuclei.csv")
    back = read_geojson(geojson, panel.mpp[0])
    np.testing.assert_allclose(back.xy_um(), again.xy_um(), atol=1e-6)
    assert list(back.label) == list(again.label)
    with open(csv_path, newline="") as fh:
        header = next(csv.reader(fh))
    assert header[:4] == ["x_um", "y_um", "label", "probability"]

    viewer.layers.remove(layer)
    assert panel.import_annotations(geojson) == len(again)
    imported = panel.current_points()
    assert imported.counts() == again.counts()
    assert before.counts()["tumour"] == 2


def test_merge_detections_keeps_work():
    old = NucleusPoints(
        x_um=np.array([10.0, 20.0, 30.0, 500.0]),
        y_um=np.array([10.0, 20.0, 30.0, 500.0]),
        label=np.array([0, 1, 0, 0], np.int8),
        source=np.array([0, 0, 1, 0], np.int8),
    )
    new = NucleusPoints(x_um=np.array([11.0, 20.5, 40.0]), y_um=np.array([11.0, 20.5, 40.0]))
    merged, replaced = merge_detections(old, new, (0, 0, 100, 100), None)
    # the unlabeled detection at 10 is replaced, the tumour one and the manual one stay, 500 is outside
    assert replaced == 1
    assert sorted(merged.x_um.tolist()) == [11.0, 20.0, 30.0, 40.0, 500.0]
    assert LABELS[merged.label[merged.x_um.tolist().index(20.0)]] == "tumour"


def test_classify_with_shipped_model_and_whole_tissue_overlay(
    make_napari_viewer, qtbot, synthetic_slide, private_slide
):
    viewer, slide_layer, panel = open_panel(make_napari_viewer, private_slide)
    add_regions(viewer, slide_layer, synthetic_slide)
    layer = detect_in_regions(panel, qtbot)
    label_from_truth(panel, layer, synthetic_slide)
    panel.select_model("nucleus-purity")
    assert panel.model_combo.currentText() == "nucleus-purity (synthetic demo)"  # marked in the list
    panel.device_combo.setCurrentIndex(panel.device_combo.findData("cpu"))
    panel.classify_button.click()
    qtbot.waitUntil(lambda: panel.classify_button.isEnabled(), timeout=WAIT_MS)
    assert "Synthetic demo model" in panel.status.text()  # and in its result
    probability = np.asarray(layer.features["probability"], float)
    assert np.isfinite(probability).all(), panel.status.text()
    assert layer.metadata["colour_by"] == "probability"
    for summary in panel.summaries:
        assert summary.predicted_purity is not None
        assert abs(summary.difference) <= 0.15, summary

    # Whole tissue: predictions in their own layers, points only when few enough are in view.
    panel.max_points_shown = 300
    panel.where_combo.setCurrentIndex(panel.where_combo.findData("tissue"))
    panel.detect_button.click()
    qtbot.waitUntil(lambda: panel.detect_button.isEnabled(), timeout=WAIT_MS)
    overlay = panel._overlay
    assert overlay is not None and len(panel.predictions) > len(layer.data)
    assert overlay.density_layer in viewer.layers and overlay.points_layer in viewer.layers
    assert overlay.grid.counts.sum() == len(panel.predictions)
    viewer.reset_view()
    overlay.update()
    assert len(overlay.points_layer.data) == 0  # the whole slide holds too many to draw
    y, x = panel.predictions.xy_um()[0][::-1]
    viewer.camera.center = (y, x)
    viewer.camera.zoom = 8.0  # a 100 um wide view
    overlay.update()
    shown = len(overlay.points_layer.data)
    assert 0 < shown <= panel.max_points_shown
    assert layer in viewer.layers and len(layer.data) == len(probability)  # ground truth untouched


def test_train_from_my_labels_hands_the_model_over(make_napari_viewer, qtbot, synthetic_slide, private_slide):
    from napari_pathology.models import load_checkpoint

    viewer, slide_layer, panel = open_panel(make_napari_viewer, private_slide)
    add_regions(viewer, slide_layer, synthetic_slide)
    layer = detect_in_regions(panel, qtbot)
    label_from_truth(panel, layer, synthetic_slide)
    panel.epochs_spin.setValue(2)
    panel.device_combo.setCurrentIndex(panel.device_combo.findData("cpu"))
    job = panel.train_from_labels()
    assert job is not None, panel.train_status.text()
    assert not panel.train_button.isEnabled()
    qtbot.waitUntil(lambda: job.done and panel.train_button.isEnabled(), timeout=WAIT_MS)
    assert job.error is None, job.error
    assert panel.model_source.endswith(".pt") and "trained here" in panel.model_combo.currentText()
    model = load_checkpoint(panel.model_source)
    assert model.spec.family == "nucleus-purity"
    assert "classifier" in panel.train_status.text()
    assert "Validation on held-out nuclei" in panel.train_status.text()  # the new model's metrics shown
    assert "AUC" in panel.train_status.text()
    assert panel.previous_button.isVisibleTo(panel)  # the previous classifier is one click away
    panel.previous_button.click()
    assert panel.model_source == "nucleus-purity" and not panel.previous_button.isVisibleTo(panel)


def test_train_refuses_unlabelled_nuclei(
    make_napari_viewer, qtbot, synthetic_slide, private_slide, monkeypatch
):
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    viewer, slide_layer, panel = open_panel(make_napari_viewer, private_slide)
    add_regions(viewer, slide_layer, synthetic_slide, labels=("normal",))
    detect_in_regions(panel, qtbot)
    assert panel.train_from_labels() is None
    assert errors and "tumour" in errors[-1].lower()


def test_cancel_whole_tissue_detection_keeps_what_was_found(make_napari_viewer, qtbot, private_slide):
    _viewer, _slide_layer, panel = open_panel(make_napari_viewer, private_slide)
    panel.where_combo.setCurrentIndex(panel.where_combo.findData("tissue"))
    panel.detect_button.click()

    def some_found() -> bool:  # a chunk event: "N nuclei in k/K chunks"
        text = panel.status.text()
        return "nuclei in" in text and not text.startswith("0 ")

    qtbot.waitUntil(some_found, timeout=WAIT_MS)
    panel.cancel()
    qtbot.waitUntil(lambda: panel.detect_button.isEnabled(), timeout=WAIT_MS)
    assert "cancelled" in panel.status.text()
    assert panel.predictions is not None and 0 < len(panel.predictions)
    assert panel.progress.value() < panel.progress.maximum()
