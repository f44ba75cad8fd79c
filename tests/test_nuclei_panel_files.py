"""Nuclei panel files: a refused autosave survives the next edit, imports merge, exports never overwrite."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

# Import the model registry before any viewer exists (see test_close_viewer.py: triton vs OpenGL).
import napari_pathology.models  # noqa: F401  isort: skip

from napari_pathology._widgets.nuclei_panel import NucleiPanel
from napari_pathology.nuclei.points import (
    LABELS,
    NucleusFileError,
    NucleusPoints,
    load_sidecar,
    write_geojson,
)

PLUGIN = "napari-pathology"
T, N, U = LABELS.index("tumour"), LABELS.index("normal"), LABELS.index("unlabeled")


@pytest.fixture
def private_slide(synthetic_slide, tmp_path):
    """The synthetic slide copied to a private folder (its autosave and exports are this test's own)."""
    path = tmp_path / "slide.tif"
    shutil.copy(synthetic_slide.slide_path, path)
    return path


def open_panel(make_napari_viewer, path):
    viewer = make_napari_viewer()
    [slide_layer] = viewer.open(str(path), plugin=PLUGIN)
    _dock, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Nuclei")
    assert isinstance(panel, NucleiPanel)
    return viewer, slide_layer, panel


def wait_autosaved(panel, qtbot) -> None:
    panel._autosave_timer.stop()
    panel.autosave_label.setText("")
    panel.autosave()
    qtbot.waitUntil(
        lambda: panel.autosave_label.text().startswith(("Autosaved", "Autosave FAILED")), timeout=10_000
    )
    assert panel.autosave_label.text().startswith("Autosaved"), panel.autosave_label.text()


@pytest.mark.parametrize(
    "content",
    [b"x_um,y_um,label\n10.0,20.0,tumour\n30.0,4", b"x_um,y_um,label\n10.0,20.0,tumour\n,,normal\n"],
)
def test_a_refused_autosave_survives_the_next_edit(make_napari_viewer, qtbot, private_slide, content):
    sidecar = private_slide.with_name(private_slide.name + ".nuclei.csv")
    sidecar.write_bytes(content)
    _viewer, _slide_layer, panel = open_panel(make_napari_viewer, private_slide)
    [kept] = [p for p in private_slide.parent.iterdir() if ".refused-" in p.name]
    assert kept.read_bytes() == content
    assert str(kept) in panel.autosave_label.text()

    layer = panel.nuclei_layer(create=True)  # the next edit: a nucleus clicked by hand
    layer.add(np.array([[100.0, 120.0]]))
    wait_autosaved(panel, qtbot)
    assert kept.read_bytes() == content  # the labels of the refused file are still there
    assert len(load_sidecar(sidecar)) == 1


def test_an_autosave_the_panel_does_not_hold_is_kept_before_writing(make_napari_viewer, qtbot, private_slide):
    viewer, _slide_layer, panel = open_panel(make_napari_viewer, private_slide)
    layer = panel.nuclei_layer(create=True)
    layer.add(np.array([[100.0, 120.0], [200.0, 220.0]]))
    wait_autosaved(panel, qtbot)
    sidecar = panel.autosave_path
    first = sidecar.read_bytes()
    assert len(load_sidecar(sidecar)) == 2
    # the layer is deleted (and the slide is not restored again this session): a new layer starts
    viewer.layers.remove(layer)
    panel.nuclei_layer(create=True).add(np.array([[50.0, 60.0]]))
    wait_autosaved(panel, qtbot)
    [kept] = [p for p in private_slide.parent.iterdir() if ".earlier-" in p.name]
    assert kept.read_bytes() == first and kept.name in panel.autosave_label.text()
    assert len(load_sidecar(sidecar)) == 1


def test_a_click_beside_the_slide_adds_no_nucleus(make_napari_viewer, qtbot, private_slide):
    _viewer, _slide_layer, panel = open_panel(make_napari_viewer, private_slide)
    layer = panel.nuclei_layer(create=True)
    layer.add(np.array([[100.0, 120.0]]))
    layer.add(np.array([[-300.0, 50.0], [50.0, 1e6]]))
    qtbot.waitUntil(lambda: len(layer.data) == 1, timeout=5_000)
    assert "2 nuclei added outside the slide were removed" in panel.status.text()
    assert panel.current_points().source_names().tolist() == ["manual"]


def test_import_merges_checks_the_slide_and_export_never_overwrites(
    make_napari_viewer, qtbot, private_slide, tmp_path, monkeypatch
):
    _viewer, _slide_layer, panel = open_panel(make_napari_viewer, private_slide)
    mpp = panel.mpp
    first = NucleusPoints([10.0, 20.0, 30.0], [10.0, 20.0, 30.0], label=[T, N, U])
    source = tmp_path / "qupath.geojson"
    write_geojson(first, source, mpp)
    assert panel.import_annotations(source) == 3
    assert panel.import_annotations(source) == 0  # the same file again doubles nothing
    assert "0 added, 3 already there" in panel.status.text()
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("x_um,y_um,label\n30.4,30.0,tumour\n")
    assert panel.import_annotations(labelled) == 0
    assert panel.current_points().label.tolist() == [T, N, T]  # the imported label won over unlabeled

    bad = tmp_path / "bad.geojson"
    for coords, match in (([float("nan"), 2], "holds NaN"), ([1e9, 2], "feature 2.*outside the slide")):
        features = [
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": c}} for c in ([1, 2], coords)
        ]
        bad.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        with pytest.raises(NucleusFileError, match=match) as info:
            panel.import_annotations(bad)
        assert "bad.geojson" in str(info.value)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("x_um,y_um\n1,2\n1,inf\n")
    with pytest.raises(NucleusFileError, match=r"bad\.csv: row 3"):
        panel.import_annotations(bad_csv)
    assert len(panel.current_points()) == 3

    # Export: never the truth file, never the autosave, never over another file without asking.
    truth = private_slide.with_name("slide.nuclei.csv")
    truth.write_text("x_um,y_um\n1,2\n")
    with pytest.raises(ValueError, match="ground truth"):
        panel.export_annotations(truth)
    with pytest.raises(ValueError, match="autosave"):
        panel.export_annotations(panel.autosave_path)
    assert truth.read_text() == "x_um,y_um\n1,2\n"
    mine = tmp_path / "mine.csv"
    mine.write_text("keep me")
    written = panel.export_annotations(mine)
    assert written == tmp_path / "mine-2.csv" and mine.read_text() == "keep me"
    assert "exists" in panel.status.text()
    assert panel.export_annotations(mine, overwrite=True) == mine and mine.read_text() != "keep me"

    proposed = {}

    def fake_dialog(parent, caption, start, file_filter):
        proposed["start"] = start
        return "", ""

    monkeypatch.setattr("napari_pathology._widgets.nuclei_files.QFileDialog.getSaveFileName", fake_dialog)
    panel._choose_export("CSV (*.csv)", ".csv")
    assert proposed["start"] == str(private_slide.with_name("slide.annotations.csv"))
