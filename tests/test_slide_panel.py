"""The Slide panel: facts, um/px override, associated images."""

from __future__ import annotations

import shutil

import pytest

from conftest import real_file
from napari_pathology._layers import slide_from_metadata
from napari_pathology._widgets.slide_panel import SlidePanel, format_facts

PLUGIN = "napari-pathology"


def test_panel_shows_facts_of_the_active_slide(make_napari_viewer, qtbot) -> None:
    viewer = make_napari_viewer()
    panel = SlidePanel(viewer)
    qtbot.addWidget(panel)
    assert panel.layer is None
    viewer.open(str(real_file("slides/cmu_small_region.svs")), plugin=PLUGIN)
    assert panel.layer is not None
    facts = {k: label.text() for k, label in panel.fact_labels.items()}
    assert facts["Vendor"] == "aperio"
    assert facts["Size"] == "2,220 x 2,967 px"
    assert facts["Physical size"] == "1.11 x 1.48 mm"
    assert facts["Objective"] == "20x"
    assert "0.499" in facts["um/px"] and "from the file" in facts["um/px"]
    names = [panel.associated_combo.itemText(i) for i in range(panel.associated_combo.count())]
    assert set(names) == {"label", "macro", "thumbnail"}
    # the preview is read in a worker and lands as a pixmap
    qtbot.waitUntil(lambda: not panel.associated_preview.pixmap().isNull(), timeout=5000)


def test_add_associated_image_as_layer(make_napari_viewer, qtbot) -> None:
    viewer = make_napari_viewer()
    panel = SlidePanel(viewer)
    qtbot.addWidget(panel)
    viewer.open(str(real_file("slides/cmu_small_region.svs")), plugin=PLUGIN)
    panel.associated_combo.setCurrentText("label")
    panel.add_associated_button.click()
    qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=5000)
    assert viewer.layers[-1].name.endswith("label") and viewer.layers[-1].rgb


@pytest.fixture(autouse=True)
def _private_settings(monkeypatch, tmp_path) -> None:
    """A um/px override is remembered per slide: never in the user's data folder during tests."""
    monkeypatch.setenv("NAPARI_PATHOLOGY_DATA", str(tmp_path / "user-data"))


def test_mpp_override_for_a_slide_without_mpp(make_napari_viewer, qtbot, tmp_path) -> None:
    viewer = make_napari_viewer()
    panel = SlidePanel(viewer)
    qtbot.addWidget(panel)
    slide_path = tmp_path / "boxes.tiff"  # a copy: the override is remembered beside the slide
    shutil.copyfile(real_file("slides/boxes.tiff"), slide_path)
    [layer] = viewer.open(str(slide_path), plugin=PLUGIN)
    assert panel.mpp_warning.isVisibleTo(panel)
    assert "unknown" in panel.fact_labels["um/px"].text()
    panel.mpp_spin.setValue(0.25)
    panel.apply_mpp_button.click()
    assert tuple(layer.scale) == pytest.approx((0.25, 0.25))
    assert str(layer.units[0]) == "micrometer"
    assert layer.metadata["mpp_source"] == "user" and not layer.metadata["mpp_missing"]
    assert "set by you" in panel.fact_labels["um/px"].text()
    assert not panel.mpp_warning.isVisibleTo(panel)
    # everything after uses it: the slide behind the layer reports the user's value
    assert slide_from_metadata(layer.metadata).mpp == (0.25, 0.25)
    panel.reset_mpp_button.click()
    assert tuple(layer.scale) == (1.0, 1.0) and layer.metadata["mpp_missing"]


def test_format_facts_without_mpp() -> None:
    facts = format_facts(
        {
            "name": "x.tif",
            "width": 10,
            "height": 20,
            "levels": 1,
            "level_downsamples": [1.0],
            "mpp_x": None,
            "mpp_y": None,
            "mpp_note": "the file records no um/px",
        }
    )
    assert facts["Physical size"] == "unknown (no um/px)"
    assert facts["um/px"] == "unknown: the file records no um/px"
    assert facts["Objective"] == "unknown"


def test_panel_is_a_napari_plugin_widget(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Slide")
    assert isinstance(widget, SlidePanel)
    assert dock.name == "Slide (napari-pathology)"
