"""Every layer derived from a slide follows the slide's um/px (issue 11: overlays at twice the size)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from napari_pathology._layers import (
    PLACED_SCALE_KEY,
    SLIDE_MARKER,
    SOURCE_KEY,
    follow_slide_scale,
    is_derived_from,
    link_metadata,
)

PLUGIN = "napari-pathology"


@pytest.fixture(autouse=True)
def _private_settings(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("NAPARI_PATHOLOGY_DATA", str(tmp_path / "user-data"))


def _slide_layer(path: str, mpp: float):
    from napari.layers import Image

    meta = {SLIDE_MARKER: True, "path": path, "mpp_x": mpp, "mpp_y": mpp}
    return Image(np.zeros((64, 48, 3), np.uint8), rgb=True, scale=(mpp, mpp), metadata=meta)


def _set_slide_mpp(layer, mpp: float) -> None:
    layer.metadata = {**layer.metadata, "mpp_x": mpp, "mpp_y": mpp}
    layer.scale = (mpp, mpp)


def test_follow_slide_scale_moves_linked_and_named_layers_once(tmp_path) -> None:
    from napari.layers import Image, Labels, Points, Shapes

    path = str(tmp_path / "a.tif")
    slide = _slide_layer(path, 0.5)
    heatmap = Image(np.zeros((3, 3)), scale=(64, 64), translate=(31.75, 31.75),
                    metadata=link_metadata(slide.metadata))  # fmt: skip
    detections = Points([[10.0, 20.0]], size=[8.0], metadata=link_metadata(slide.metadata))
    tissue = Labels(np.zeros((3, 3), np.uint8), scale=(8, 8), translate=(3.75, 3.75),
                    metadata={"slide_path": path, "mask_mpp": 8.0, "slide_mpp": [0.5, 0.5]})  # fmt: skip
    nuclei = Points([[4.0, 6.0]], size=[7.0], features=pd.DataFrame({"area_um2": [30.0]}),
                    metadata={"napari_pathology_nuclei": path})  # made without the link  # fmt: skip
    regions = Shapes([np.array([[0.0, 0.0], [0, 10], [10, 10]])], shape_type=["polygon"],
                     metadata=link_metadata(slide.metadata))  # fmt: skip
    other_slide = Image(np.zeros((3, 3)), metadata=link_metadata({"path": str(tmp_path / "b.tif")}))
    unrelated = Image(np.zeros((3, 3)), scale=(2, 2))

    _set_slide_mpp(slide, 1.0)
    layers = [slide, heatmap, detections, tissue, nuclei, regions, other_slide, unrelated]
    moved = follow_slide_scale(layers, slide, old_scale=(0.5, 0.5))

    assert {id(layer) for layer in moved} == {id(x) for x in (heatmap, detections, tissue, nuclei, regions)}
    assert tuple(heatmap.scale) == (128, 128) and tuple(heatmap.translate) == (63.5, 63.5)
    assert detections.data.tolist() == [[20.0, 40.0]] and detections.size.tolist() == [16.0]
    assert tuple(tissue.scale) == (16, 16) and tuple(tissue.translate) == (7.5, 7.5)
    assert tissue.metadata["mask_mpp"] == 16.0 and tissue.metadata["slide_mpp"] == [1.0, 1.0]
    assert nuclei.data.tolist() == [[8.0, 12.0]] and nuclei.features["area_um2"].tolist() == [120.0]
    assert nuclei.metadata[SOURCE_KEY] == path and nuclei.metadata[PLACED_SCALE_KEY] == [1.0, 1.0]
    assert regions.data[0].tolist() == [[0, 0], [0, 20], [20, 20]] and regions.shape_type == ["polygon"]
    assert tuple(other_slide.scale) == (1, 1) and tuple(unrelated.scale) == (2, 2)
    assert tuple(slide.scale) == (1, 1)
    # idempotent: a second call (another panel following the same change) moves nothing
    assert follow_slide_scale(layers, slide, old_scale=(0.5, 0.5)) == []
    assert tuple(heatmap.scale) == (128, 128) and nuclei.data.tolist() == [[8.0, 12.0]]


def test_is_derived_from_reads_any_key_naming_the_slide(tmp_path) -> None:
    path = tmp_path / "a.tif"
    assert is_derived_from({"napari_pathology_nucleus_predictions": str(path)}, str(path))
    assert is_derived_from({SOURCE_KEY: str(tmp_path / "." / "a.tif")}, str(path))
    assert not is_derived_from({SOURCE_KEY: str(tmp_path / "b.tif"), "x": str(path)}, str(path))
    assert not is_derived_from({SLIDE_MARKER: True, "path": str(path)}, str(path))
    assert not is_derived_from({}, str(path)) and not is_derived_from({"a": str(path)}, None)


def _pixel_box(layer, slide_layer) -> np.ndarray:
    """A layer's world bounding box in the slide's level-0 pixels (what must not move)."""
    if layer._type_string == "points":
        world = np.asarray(layer.data, float)
    else:
        lo, hi = np.asarray(layer.extent.world, float)
        world = np.array([lo, hi])
    pixels = np.array([slide_layer.world_to_data(w) for w in world])
    return np.array([pixels.min(0), pixels.max(0)])


def test_changing_um_per_px_keeps_every_derived_layer_on_its_slide(
    make_napari_viewer, qtbot, synthetic_slide, tmp_path
) -> None:
    from napari_pathology._widgets.analyze_panel import AnalyzePanel
    from napari_pathology._widgets.nuclei_layers import PredictionOverlay, add_nuclei_layer
    from napari_pathology._widgets.slide_panel import SlidePanel
    from napari_pathology._widgets.tissue_panel import TissuePanel, tissue_mask_from_layer
    from napari_pathology.nuclei.points import NucleusPoints
    from napari_pathology.tissue import TissueMask

    path = tmp_path / "slide.tif"  # a copy: Apply remembers the um/px beside the slide
    shutil.copyfile(synthetic_slide.slide_path, path)
    viewer = make_napari_viewer()
    [slide_layer] = viewer.open(str(path), plugin=PLUGIN)
    slide_panel, analyze, tissue_panel = SlidePanel(viewer), AnalyzePanel(viewer), TissuePanel(viewer)
    for widget in (slide_panel, analyze, tissue_panel):
        qtbot.addWidget(widget)
    analyze.select_model("nuclear-density")
    analyze.out_edit.setText(str(tmp_path / "results"))
    analyze.run_button.click()
    qtbot.waitUntil(lambda: analyze.run_button.isEnabled(), timeout=120_000)
    heatmap = viewer.layers[f"{slide_layer.name} nuclear-density heatmap"]
    detections = viewer.layers[f"{slide_layer.name} nuclear-density detections"]
    assert len(detections.data) >= 1, analyze.status.text()

    mask = np.zeros((384, 384), bool)
    mask[100:200, 50:300] = True
    tissue = tissue_panel.show_mask(TissueMask(mask, 8.0, (3072, 3072), (0.5, 0.5)), slide_layer, str(path))
    area = tissue_mask_from_layer(tissue).area_mm2
    points = NucleusPoints(x_um=np.array([100.0, 700.0]), y_um=np.array([200.0, 900.0]))
    nuclei = add_nuclei_layer(viewer, slide_layer, points, "nuclei")  # made without the link
    overlay = PredictionOverlay(viewer, slide_layer, points, "predicted")  # made without the link
    regions = viewer.add_shapes(
        [np.array([[10.0, 10], [10, 400], [300, 400]])], shape_type="polygon",
        metadata=link_metadata(slide_layer.metadata),
    )  # fmt: skip
    derived = [heatmap, detections, tissue, nuclei, overlay.density_layer, overlay.points_layer, regions]
    assert len(overlay.points_layer.data) == 2
    before = [_pixel_box(layer, slide_layer) for layer in derived]
    sizes = detections.size.copy()

    slide_panel.mpp_spin.setValue(1.0)
    slide_panel.apply_mpp_button.click()
    assert tuple(slide_layer.scale) == pytest.approx((1.0, 1.0))
    qtbot.wait(200)  # the overlay redraws its in-view points after the camera moved
    for layer, box in zip(derived, before, strict=True):
        assert _pixel_box(layer, slide_layer) == pytest.approx(box, abs=1e-6), layer.name
    assert detections.size == pytest.approx(sizes * 2)
    assert tissue_mask_from_layer(tissue).area_mm2 == pytest.approx(area * 4)

    slide_panel.reset_mpp_button.click()  # back to the file's 0.5
    qtbot.wait(200)
    for layer, box in zip(derived, before, strict=True):
        assert _pixel_box(layer, slide_layer) == pytest.approx(box, abs=1e-6), layer.name
    assert tuple(heatmap.scale) == pytest.approx((128.0, 128.0))
