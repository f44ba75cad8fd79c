"""A um/px the user sets is remembered per slide, beside it, and restored on reopen (issue 11)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from napari_pathology.slide.settings import remember_mpp, remembered_mpp, settings_paths

PLUGIN = "napari-pathology"


@pytest.fixture(autouse=True)
def user_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_PATHOLOGY_DATA", str(tmp_path / "user-data"))
    folder = tmp_path / "user-data" / "slides"
    return folder


@pytest.fixture
def plain_slide(tmp_path):
    """A small TIFF that records no um/px."""
    import tifffile

    path = tmp_path / "slides" / "plain.tif"
    path.parent.mkdir()
    image = np.full((512, 640, 3), 235, np.uint8)
    image[100:300, 150:500] = (200, 120, 170)
    tifffile.imwrite(path, image, photometric="rgb")
    return path


def test_remember_then_forget_beside_the_slide(plain_slide) -> None:
    beside, _ = settings_paths(plain_slide)
    assert remembered_mpp(plain_slide) == (None, None, None)
    assert remember_mpp(plain_slide, 0.25) == beside
    assert json.loads(beside.read_text()) == {"mpp": 0.25, "slide": "plain.tif"}
    assert remembered_mpp(plain_slide) == (0.25, beside, None)
    assert remember_mpp(plain_slide, None) is None
    assert not beside.exists() and remembered_mpp(plain_slide) == (None, None, None)


def test_read_only_slide_folder_falls_back_to_the_user_folder(plain_slide, user_dir, monkeypatch) -> None:
    beside, fallback = settings_paths(plain_slide)
    assert fallback.parent == user_dir and fallback.name.startswith("plain.tif.")
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(beside.parent) else real_access(p, mode)
    )
    assert remember_mpp(plain_slide, 0.5) == fallback
    assert not beside.exists() and remembered_mpp(plain_slide)[:2] == (0.5, fallback)
    # two slides of the same name in different folders never share a fallback file
    assert settings_paths(plain_slide.parent.parent / "other" / "plain.tif")[1] != fallback
    remember_mpp(plain_slide, None)
    assert remembered_mpp(plain_slide) == (None, None, None)


def test_the_newer_file_wins_and_a_bad_one_is_reported(plain_slide) -> None:
    beside, fallback = settings_paths(plain_slide)
    fallback.parent.mkdir(parents=True)
    fallback.write_text(json.dumps({"mpp": 0.5}))
    beside.write_text(json.dumps({"mpp": 0.25}))
    os.utime(fallback, (1e9, 1e9))
    assert remembered_mpp(plain_slide)[:2] == (0.25, beside)
    fallback.write_text(json.dumps({"mpp": None}))  # "Use file's" where the slide's folder is read-only
    assert remembered_mpp(plain_slide) == (None, None, None)
    for bad in ('{"mpp": NaN}', '{"mpp": -1}', '{"mpp": "abc"}', "[1, 2]", "{not json"):
        beside.write_text(bad)
        os.utime(beside, (2e9, 2e9))
        mpp, _, problem = remembered_mpp(plain_slide)
        assert mpp is None and str(beside) in problem and "not used" in problem
    with pytest.raises(ValueError, match="um/px"):
        remember_mpp(plain_slide, float("nan"))


def test_override_is_restored_on_reopen_and_nuclei_land_in_place(
    make_napari_viewer, qtbot, plain_slide
) -> None:
    from napari.utils.notifications import notification_manager

    from napari_pathology._widgets.nuclei_panel import NucleiPanel
    from napari_pathology._widgets.slide_panel import SlidePanel
    from napari_pathology.nuclei.points import sidecar_path

    viewer = make_napari_viewer()
    slide_panel, nuclei_panel = SlidePanel(viewer), NucleiPanel(viewer)
    qtbot.addWidget(slide_panel)
    qtbot.addWidget(nuclei_panel)
    [layer] = viewer.open(str(plain_slide), plugin=PLUGIN)
    assert tuple(layer.scale) == (1.0, 1.0)
    slide_panel.mpp_spin.setValue(0.25)
    slide_panel.apply_mpp_button.click()
    assert tuple(layer.scale) == pytest.approx((0.25, 0.25))
    pixels = np.array([[200.0, 300.0], [400.0, 100.0]])  # level-0 (row, col) the user clicked
    nuclei = nuclei_panel.nuclei_layer(create=True)
    nuclei.data = np.array([layer.data_to_world(p) for p in pixels])
    nuclei_panel.autosave()
    autosave = sidecar_path(plain_slide)
    qtbot.waitUntil(autosave.exists, timeout=10_000)

    seen = []
    original = notification_manager.dispatch
    notification_manager.dispatch = lambda n: seen.append(str(n.message))
    try:
        viewer2 = make_napari_viewer()
        nuclei_panel2 = NucleiPanel(viewer2)
        qtbot.addWidget(nuclei_panel2)
        [layer2] = viewer2.open(str(plain_slide), plugin=PLUGIN)
    finally:
        notification_manager.dispatch = original
    assert tuple(layer2.scale) == pytest.approx((0.25, 0.25))
    assert layer2.metadata["mpp_source"] == "user" and not layer2.metadata["mpp_missing"]
    assert any("restored" in m and "0.25" in m for m in seen), seen
    assert not any("Showing it in pixels" in m for m in seen)
    restored = nuclei_panel2.nuclei_layer()
    assert restored is not None
    back = np.array([layer2.world_to_data(w) for w in restored.data])
    assert back == pytest.approx(pixels, abs=1e-6)

    # "Use file's" forgets it: the next open is in pixels again
    slide_panel2 = SlidePanel(viewer2)
    qtbot.addWidget(slide_panel2)
    slide_panel2.reset_mpp_button.click()
    assert remembered_mpp(plain_slide) == (None, None, None)
    viewer3 = make_napari_viewer()
    [layer3] = viewer3.open(str(plain_slide), plugin=PLUGIN)
    assert tuple(layer3.scale) == (1.0, 1.0) and layer3.metadata["mpp_missing"]


def test_open_slide_and_the_cli_use_the_remembered_mpp(plain_slide, capsys) -> None:
    from napari_pathology.cli import main
    from napari_pathology.slide import open_slide

    remember_mpp(plain_slide, 0.5)
    slide = open_slide(plain_slide)
    assert slide.mpp == (0.5, 0.5) and slide.mpp_source == "user"
    assert slide.mpp_restored_from == settings_paths(plain_slide)[0]
    assert open_slide(plain_slide, remembered=False).mpp is None
    assert open_slide(plain_slide, mpp=0.25).mpp == (0.25, 0.25)  # an explicit value wins
    assert main(["info", str(plain_slide)]) == 0
    assert "0.5 x 0.5 um/px" in capsys.readouterr().out
    settings_paths(plain_slide)[0].write_text('{"mpp": "abc"}')
    slide = open_slide(plain_slide)
    assert slide.mpp is None and any("abc" in w for w in slide.warnings)


def test_read_only_slides_with_one_name_never_share_an_autosave(tmp_path, monkeypatch) -> None:
    from napari_pathology.nuclei.points import sidecar_path

    first, second = tmp_path / "a" / "case.svs", tmp_path / "b" / "case.svs"
    monkeypatch.setattr(os, "access", lambda p, mode: False)  # both slide folders read-only
    assert sidecar_path(first) != sidecar_path(second)
    assert sidecar_path(first).parent == tmp_path / "user-data" / "nuclei"
    legacy = tmp_path / "user-data" / "nuclei" / "case.svs.nuclei.csv"
    legacy.write_text("x_um,y_um,label\n")  # an autosave from before: still found when it is the only one
    assert sidecar_path(first) == legacy
