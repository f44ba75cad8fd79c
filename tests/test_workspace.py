"""The viewer as a workspace (issue 16): scale that holds, room for the slide, overlays that show the H&E."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from napari_pathology._viewer import DOCK_WIDTH, dock_panels, scale_bar

PLUGIN = "napari-pathology"


@pytest.fixture
def viewer_on_slide(make_napari_viewer, synthetic_slide):
    viewer = make_napari_viewer()
    [slide_layer] = viewer.open(str(synthetic_slide.slide_path), plugin=PLUGIN)
    return viewer, slide_layer


# ----------------------------------------------------------------------------- scale (item 1)
def test_a_new_pixel_unit_shapes_layer_is_put_on_the_slide_micrometres(viewer_on_slide, qtbot) -> None:
    from napari_pathology._widgets.analyze_panel import AnalyzePanel

    viewer, slide_layer = viewer_on_slide
    qtbot.addWidget(AnalyzePanel(viewer))  # any panel watches the viewer
    assert scale_bar(viewer).visible  # on once a slide is open
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the moment before adoption
        shapes = viewer.add_shapes(ndim=2, scale=(1, 1), units=("pixel", "pixel"))  # as napari's button can
    assert [str(u) for u in shapes.units] == ["micrometer", "micrometer"]
    assert tuple(shapes.scale) == (1.0, 1.0)  # empty: drawn later in world micrometres
    assert shapes.metadata["napari_pathology_source"] == slide_layer.metadata["path"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Inconsistent units across layers" would fail here
        viewer.window._qt_viewer.layerButtons.newShapesButton.click()
        viewer.layers.selection.active = slide_layer
        shapes.add_rectangles(np.array([[100.0, 100.0], [300.0, 400.0]]))
    assert str(viewer.layers[-1].units[-1]) == "micrometer"


def test_a_shapes_layer_in_slide_pixels_is_converted_to_the_slide_scale(viewer_on_slide, qtbot) -> None:
    from napari_pathology._widgets.analyze_panel import AnalyzePanel

    viewer, slide_layer = viewer_on_slide
    qtbot.addWidget(AnalyzePanel(viewer))
    box_px = np.array([[0.0, 0.0], [0.0, 200.0], [100.0, 200.0], [100.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # napari warns while the layer is still in pixels
        shapes = viewer.add_shapes([box_px], shape_type="polygon", units=("pixel", "pixel"))
    np.testing.assert_allclose(shapes.scale, slide_layer.scale)  # 200 px wide = 100 um at 0.5 um/px
    np.testing.assert_allclose(shapes.data_to_world(box_px[2]), box_px[2] * slide_layer.scale)


def test_nuclei_panel_new_regions_layer_is_in_micrometres(viewer_on_slide, qtbot) -> None:
    from napari_pathology._widgets.nuclei_panel import NucleiPanel

    viewer, _ = viewer_on_slide
    panel = NucleiPanel(viewer)
    qtbot.addWidget(panel)
    panel.new_regions_button.click()
    layer = viewer.layers[-1]
    assert layer._type_string == "shapes" and panel.regions_layer() is layer
    assert str(layer.units[-1]) == "micrometer" and layer.mode == "add_polygon"


# ----------------------------------------------------------------------------- room (item 2)
@pytest.mark.parametrize("size", [(1366, 768), (1600, 1000)])
def test_canvas_keeps_most_of_the_window_with_the_panels_open(make_napari_viewer, qtbot, size) -> None:
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.showNormal()
    window.resize(*size)
    docks = dock_panels(viewer)
    qtbot.wait(300)
    canvas = viewer.window._qt_viewer.canvas.native
    share = canvas.width() / window.width()
    print(f"{size}: canvas {canvas.width()}x{canvas.height()}, {share:.0%} of the window width")
    assert (window.width(), window.height()) == size  # no panel forces the window taller than the screen
    assert share >= 0.6
    assert len(docks) == 5 and docks[-1].width() <= DOCK_WIDTH + 20  # the shown tab: Analyze
    assert {window.dockWidgetArea(d) for d in docks} == {window.dockWidgetArea(docks[0])}  # one area
    assert len(window.tabifiedDockWidgets(docks[-1])) >= 4  # as tabs
    for dock in docks:  # each panel scrolls rather than demanding height
        assert dock.widget().minimumSizeHint().height() < size[1] // 2


# ----------------------------------------------------------------------------- overlays (item 3)
def test_tissue_is_an_outline_unless_filled(viewer_on_slide, qtbot) -> None:
    from napari_pathology._widgets.tissue_panel import TissuePanel
    from napari_pathology.tissue import TissueMask

    viewer, slide_layer = viewer_on_slide
    panel = TissuePanel(viewer)
    qtbot.addWidget(panel)
    mask = np.zeros((48, 48), bool)
    mask[10:30, 12:40] = True
    tissue = TissueMask(mask=mask, mpp=32.0, slide_size=(3072, 3072), slide_mpp=(0.5, 0.5), method="otsu")
    layer = panel.show_mask(tissue, slide_layer, slide_layer.metadata["path"])
    assert layer.contour > 0 and layer.opacity > 0.5  # the H&E inside stays visible
    panel.fill_check.setChecked(True)
    assert layer.contour == 0 and layer.opacity < 0.5


def _result(slide_layer, kind="probability", **changes):
    from napari_pathology.analysis import AnalysisResult

    mpp = (slide_layer.scale[1], slide_layer.scale[0])
    heatmap = np.linspace(0, 1, 144, dtype=np.float32).reshape(12, 12)
    heatmap[0, 0] = np.nan
    values = {
        "slide_path": slide_layer.metadata["path"], "slide_name": slide_layer.name,
        "spec": {"name": "toy", "aggregator": "max", "input_size": 299, "mpp": 1.0, "centre_size": 128,
                 "positive_class": "tumour", "description": "toy (synthetic demo, not for diagnostic use)"},
        "heatmap": heatmap, "class_heatmaps": None, "cell_um": 128.0, "first_centre_um": (64.0, 64.0),
        "slide_mpp": mpp, "detections": np.array([[300.0, 400.0, 0.9], [800.0, 700.0, 0.7]]),
        "slide_score": 0.9, "scores": {"normal": 0.99, "tumour": 0.9}, "partial": False, "tiles_done": 143,
        "tiles_total": 143, "heatmap_kind": kind,
    }  # fmt: skip
    values.update(changes)
    return AnalysisResult(**values)


def test_result_overlays_rings_legend_and_layers_reused(viewer_on_slide, qtbot) -> None:
    from napari_pathology._widgets.analyze_panel import AnalyzePanel

    viewer, slide_layer = viewer_on_slide
    panel = AnalyzePanel(viewer)
    qtbot.addWidget(panel)
    panel.show_result(_result(slide_layer))
    heatmap = viewer.layers[f"{slide_layer.name} toy heatmap"]
    rings = viewer.layers[f"{slide_layer.name} toy detections"]
    assert np.allclose(rings.face_color[:, 3], 0) and rings.opacity < 1  # rings, not discs
    assert np.allclose(rings.size, 128.0)  # the model's labelled centre: 128 px at 1 um/px
    assert heatmap.colormap.map(np.array([0.0]))[0, 3] > 0  # a covered cell at 0 leaves a faint trace
    assert panel.legend.isVisibleTo(panel) and "probability of the positive class" in panel.legend.text()
    assert panel.legend.text().startswith("0 .. 1")
    # honest numbers: what the score is, the demo mark, a partial result marked
    text = panel.score_label.text()
    assert "highest tumour probability of any tile" in text and "synthetic demo" in text
    assert "per class, its highest tile probability" in panel.status.text()
    panel.show_result(_result(slide_layer, partial=True, tiles_done=40, slide_score=0.5))
    assert "PARTIAL (40/143 tiles" in panel.score_label.text()
    # a rerun of the same model on the same slide: the same layers, new data in place
    added = []
    viewer.layers.events.inserted.connect(lambda e: added.append(e.value))
    removed = []
    viewer.layers.events.removed.connect(lambda e: removed.append(e.value))
    panel.show_result(_result(slide_layer, detections=np.array([[500.0, 500.0, 0.95]])))
    assert not added and not removed
    assert viewer.layers[f"{slide_layer.name} toy detections"] is rings and len(rings.data) == 1


def test_attention_gallery_thumbnails_centre_the_viewer(viewer_on_slide, qtbot) -> None:
    from napari_pathology._widgets.analyze_layers import _camera
    from napari_pathology._widgets.analyze_panel import AnalyzePanel

    viewer, slide_layer = viewer_on_slide
    panel = AnalyzePanel(viewer)
    qtbot.addWidget(panel)
    raw = np.random.default_rng(1).normal(0, 2, (12, 12)).astype(np.float32)
    result = _result(
        slide_layer, kind="attention", heatmap=raw,
        spec={"name": "clam-toy", "aggregator": "attention", "input_size": 64, "mpp": 1.0},
        scores={"normal": 0.2, "tumour": 0.8}, slide_score=0.8, score_name="tumour probability",
    )  # fmt: skip
    panel.show_result(result)
    assert "class probabilities (sum to 1): normal 0.200, tumour 0.800" in panel.status.text()
    assert "Tumour probability: 0.800" in panel.score_label.text()
    gallery = panel.gallery
    assert len(gallery.buttons) == 2 and gallery.buttons[0].text() == "0.900"
    qtbot.waitUntil(lambda: not gallery.buttons[-1].icon().isNull(), timeout=10_000)
    gallery.buttons[1].click()
    centre = np.asarray(_camera(viewer).center)[-2:]
    expected = np.array([700.0, 800.0]) - np.array(slide_layer.scale) / 2  # (y, x) world of the patch
    np.testing.assert_allclose(centre, expected, atol=1e-6)
    panel.show_result(_result(slide_layer))  # another kind: no gallery, no percentile toggle
    assert not gallery.buttons and not panel.percentile_check.isVisibleTo(panel)


# ----------------------------------------------------------------------------- detect guard (item 6)
def test_detect_over_a_large_view_asks_and_can_route_to_whole_tissue(viewer_on_slide, qtbot) -> None:
    from napari_pathology._widgets.nuclei_panel import NucleiPanel

    viewer, _ = viewer_on_slide
    viewer.reset_view()  # the whole 1.5 mm slide: about 9,000 nuclei at the assumed density
    panel = NucleiPanel(viewer)
    qtbot.addWidget(panel)
    asked = []
    panel.ask_large = lambda text: asked.append(text) or "cancel"
    panel.detect_button.click()
    assert asked and "nuclei" in asked[0] and panel.worker is None
    assert "not started" in panel.status.text()
    routed = []
    panel.ask_large = lambda text: routed.append(text) or "tissue"
    panel.detect_button.click()
    assert panel.where_combo.currentData() == "tissue" and panel.worker is not None
    panel.cancel()
    qtbot.waitUntil(lambda: panel.detect_button.isEnabled(), timeout=60_000)
    # a small view goes ahead without asking
    asked.clear()
    panel.ask_large = lambda text: asked.append(text) or "cancel"
    panel.where_combo.setCurrentIndex(panel.where_combo.findData("view"))
    viewer.camera.zoom *= 30
    panel.detect_button.click()
    assert not asked and panel.worker is not None
    panel.cancel()
    qtbot.waitUntil(lambda: panel.detect_button.isEnabled(), timeout=60_000)
