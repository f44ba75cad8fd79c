"""The Tissue panel: detect in a worker, a labels layer on the slide, live area, import/save."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from napari_pathology._widgets.tissue_panel import (
    TISSUE_MARKER,
    TissuePanel,
    find_tissue_layer,
    tissue_mask_from_layer,
)
from napari_pathology.slide.synthetic import load_truth
from napari_pathology.tissue import load_tissue_mask

PLUGIN = "napari-pathology"
TIMEOUT_MS = 30_000


def area_in_label(panel: TissuePanel) -> float:
    text = panel.area_label.text()
    assert text.startswith("Tissue: "), text
    return float(text.split()[1])


@pytest.fixture
def panel_with_slide(make_napari_viewer, qtbot, synthetic_slide):
    viewer = make_napari_viewer()
    panel = TissuePanel(viewer)
    qtbot.addWidget(panel)
    [slide_layer] = viewer.open(str(synthetic_slide.slide_path), plugin=PLUGIN)
    return viewer, panel, slide_layer


def detect_and_wait(qtbot, viewer, panel, path):
    panel.detect_button.click()
    qtbot.waitUntil(lambda: find_tissue_layer(viewer, str(path)) is not None, timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: panel.detect_button.isEnabled(), timeout=TIMEOUT_MS)
    return find_tissue_layer(viewer, str(path))


def test_detect_adds_a_labels_layer_on_the_slide(panel_with_slide, qtbot, synthetic_slide) -> None:
    viewer, panel, slide_layer = panel_with_slide
    assert panel.slide_layer is slide_layer and panel.detect_button.isEnabled()
    layer = detect_and_wait(qtbot, viewer, panel, synthetic_slide.slide_path)
    assert layer._type_string == "labels" and layer.name == f"{slide_layer.name} tissue"
    meta = layer.metadata
    assert meta[TISSUE_MARKER] and meta["mask_mpp"] == 8.0
    assert meta["slide_size"] == [3072, 3072] and meta["slide_mpp"] == [0.5, 0.5]
    assert str(layer.units[0]) == str(slide_layer.units[0]) == "micrometer"

    # world positions of tissue pixels fall on tissue in the ground truth, via the slide layer
    truth = np.asarray(Image.open(synthetic_slide.tissue_png)) > 0
    core = ndimage.binary_erosion(layer.data > 0, iterations=2)
    rows, cols = np.nonzero(core)
    pick = np.random.default_rng(0).choice(len(rows), 400, replace=False)
    hits = 0
    for r, c in zip(rows[pick], cols[pick], strict=True):
        world = layer.data_to_world((r, c))
        y0, x0 = slide_layer.world_to_data(world)  # level-0 pixel (centre-based)
        y_um, x_um = (y0 + 0.5) * 0.5, (x0 + 0.5) * 0.5
        assert y_um == pytest.approx((r + 0.5) * 8.0) and x_um == pytest.approx((c + 0.5) * 8.0)
        hits += truth[int(y_um // synthetic_slide.mask_mpp), int(x_um // synthetic_slide.mask_mpp)]
    assert hits / len(pick) > 0.97

    truth_area = load_truth(synthetic_slide.slide_path)["tissue_area_mm2"]
    assert area_in_label(panel) == pytest.approx(truth_area, rel=0.1)

    # detecting again updates the same layer
    panel.method_combo.setCurrentIndex(panel.method_combo.findData("otsu"))
    panel.detect_button.click()
    qtbot.waitUntil(lambda: layer.metadata["method"] == "otsu", timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: panel.detect_button.isEnabled(), timeout=TIMEOUT_MS)
    assert sum(is_t for is_t in (TISSUE_MARKER in lay.metadata for lay in viewer.layers)) == 1


def test_painting_updates_the_mask_and_the_area(panel_with_slide, qtbot, synthetic_slide) -> None:
    viewer, panel, _ = panel_with_slide
    layer = detect_and_wait(qtbot, viewer, panel, synthetic_slide.slide_path)
    before_label = area_in_label(panel)
    before = tissue_mask_from_layer(layer)
    assert before_label == pytest.approx(before.area_mm2, abs=0.006)

    # erase a block the way the paint tools do (data_setitem records history and emits paint)
    rows, cols = np.nonzero(layer.data[40:120, 40:120] > 0)
    assert len(rows) > 100
    layer.data_setitem((rows + 40, cols + 40), 0)
    erased_mm2 = len(rows) * 64 / 1e6
    after = tissue_mask_from_layer(layer)
    assert not after.mask[40:120, 40:120].any()
    assert after.area_mm2 == pytest.approx(before.area_mm2 - erased_mm2, abs=1e-6)
    qtbot.waitUntil(lambda: area_in_label(panel) < before_label - erased_mm2 / 2, timeout=5000)
    assert area_in_label(panel) == pytest.approx(after.area_mm2, abs=0.006)

    # direct edits followed by a refresh are followed too
    layer.data[:] = 0
    layer.data[:50, :50] = 1
    layer.refresh()
    qtbot.waitUntil(lambda: area_in_label(panel) == pytest.approx(2500 * 64 / 1e6, abs=0.006), timeout=5000)
    assert tissue_mask_from_layer(layer).mask.sum() == 2500

    # undo (of the erase stroke) puts tissue back and the area follows
    layer.undo()
    qtbot.waitUntil(lambda: area_in_label(panel) > 2500 * 64 / 1e6 + 0.1, timeout=5000)


def test_save_and_import_round_trip(panel_with_slide, qtbot, synthetic_slide, tmp_path) -> None:
    viewer, panel, _ = panel_with_slide
    layer = detect_and_wait(qtbot, viewer, panel, synthetic_slide.slide_path)
    layer.data[:20, :20] = 1  # a painted correction must be what is saved
    panel.save_to(tmp_path / "slide.tissue.png")
    qtbot.waitUntil(lambda: panel.status_label.text().startswith("Saved"), timeout=TIMEOUT_MS)
    assert {p.name for p in tmp_path.iterdir()} == {
        "slide.tissue.png",
        "slide.tissue.json",
        "slide.tissue.geojson",
    }
    saved = load_tissue_mask(tmp_path / "slide.tissue.json")
    np.testing.assert_array_equal(saved.mask, layer.data > 0)

    layer.data[:] = 0
    layer.refresh()
    panel.import_file(tmp_path / "slide.tissue.geojson")
    qtbot.waitUntil(lambda: (layer.data > 0).sum() > 1000, timeout=TIMEOUT_MS)
    same = ((layer.data > 0) & saved.mask).sum() / ((layer.data > 0) | saved.mask).sum()
    assert same > 0.95 and find_tissue_layer(viewer, str(synthetic_slide.slide_path)) is layer


def test_empty_slide_says_no_tissue(make_napari_viewer, qtbot, tmp_path) -> None:
    import tifffile

    path = tmp_path / "blank.tif"
    tifffile.imwrite(
        path,
        np.full((1024, 1024, 3), 250, np.uint8),
        tile=(256, 256),
        photometric="rgb",
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    viewer = make_napari_viewer()
    panel = TissuePanel(viewer)
    qtbot.addWidget(panel)
    viewer.open(str(path), plugin=PLUGIN)
    layer = detect_and_wait(qtbot, viewer, panel, path)
    assert not layer.data.any()
    assert panel.area_label.text() == "No tissue found"
    assert "No tissue found" in panel.status_label.text()


def test_slide_without_mpp_points_to_the_slide_panel(make_napari_viewer, qtbot, tmp_path) -> None:
    path = tmp_path / "plain.png"
    Image.fromarray(np.full((256, 256, 3), 200, np.uint8)).save(path)
    viewer = make_napari_viewer()
    panel = TissuePanel(viewer)
    qtbot.addWidget(panel)
    viewer.open(str(path), plugin=PLUGIN)
    assert "Slide panel" in panel.status_label.text()
    panel.detect_button.click()
    assert "Slide panel" in panel.status_label.text()
    assert find_tissue_layer(viewer, str(path)) is None and panel.detect_button.isEnabled()


def test_tissue_mask_from_layer_rejects_other_layers(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="not a tissue mask"):
        tissue_mask_from_layer(layer)


def test_tissue_layer_follows_a_um_per_px_override(panel_with_slide, qtbot, synthetic_slide) -> None:
    from napari_pathology._layers import apply_mpp, slide_from_metadata

    viewer, panel, slide_layer = panel_with_slide
    layer = detect_and_wait(qtbot, viewer, panel, synthetic_slide.slide_path)
    area = tissue_mask_from_layer(layer).area_mm2
    slide = slide_from_metadata(slide_layer.metadata)

    def set_mpp(mpp):
        metadata = dict(slide_layer.metadata)
        scale = apply_mpp(metadata, slide, mpp)
        slide_layer.metadata = metadata
        slide_layer.scale = scale

    set_mpp(0.25)  # what the Slide panel's Apply does
    try:
        assert tuple(layer.scale) == pytest.approx((4.0, 4.0))
        assert layer.metadata["mask_mpp"] == 4.0 and layer.metadata["slide_mpp"] == [0.25, 0.25]
        assert tissue_mask_from_layer(layer).area_mm2 == pytest.approx(area / 4)
        # a mask pixel's centre still lands on the same level-0 pixel
        y0, x0 = slide_layer.world_to_data(layer.data_to_world((10, 20)))
        assert (y0 + 0.5, x0 + 0.5) == pytest.approx((10.5 * 16, 20.5 * 16))
    finally:
        set_mpp(None)
    assert tuple(layer.scale) == pytest.approx((8.0, 8.0))


def test_cancel_keeps_the_panel_usable(panel_with_slide, qtbot) -> None:
    _viewer, panel, _slide_layer = panel_with_slide
    panel.detect_button.click()
    assert panel.cancel_button.isEnabled() and not panel.detect_button.isEnabled()
    panel.cancel()
    assert panel.status_label.text() == "Cancelled." and not panel.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: panel.detect_button.isEnabled(), timeout=TIMEOUT_MS)
    assert panel.progress_bar.maximum() == 1 and not panel.cancel_button.isEnabled()
    panel.cancel()  # nothing runs: nothing happens


def test_layer_metadata_round_trip_without_napari() -> None:
    from napari_pathology.tissue import TissueMask
    from napari_pathology.tissue.layer import format_area, labels_layer_args, mask_from_labels

    mask = TissueMask(np.eye(4, dtype=bool), 8.0, (64, 64), (0.5, 0.5), "otsu", {})
    args = labels_layer_args(mask, "slide", ("micrometer", "micrometer"), "/x/slide.tif")
    assert args["name"] == "slide tissue" and args["scale"] == (8.0, 8.0)
    back = mask_from_labels(np.eye(4, dtype=np.uint8) * 3, args["metadata"], "slide tissue")
    assert np.array_equal(back.mask, mask.mask) and back.method == "otsu" and back.slide_mpp == (0.5, 0.5)
    assert format_area(back).startswith("Tissue: ")
    with pytest.raises(ValueError, match="not a tissue mask"):
        mask_from_labels(np.zeros((4, 4)), {"mask_mpp": 8.0}, "other")
    with pytest.raises(ValueError, match="must be 2-D"):
        mask_from_labels(np.zeros((2, 4, 4)), args["metadata"], "stack")
