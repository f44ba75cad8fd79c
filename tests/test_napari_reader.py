"""napari integration: the reader, layers with true scale, notifications, laziness on screen."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import procedural_levels, real_file
from napari_pathology._layers import slide_layer_data
from napari_pathology._reader import napari_get_reader
from napari_pathology._viewer import scale_bar, show_scale_bar
from napari_pathology._widgets import SlidePanel
from napari_pathology.slide import InMemoryBackend, Slide

PLUGIN = "napari-pathology"


@pytest.fixture
def notifications(monkeypatch):
    """Collect napari notifications instead of showing them."""
    from napari.utils.notifications import notification_manager

    seen = []
    monkeypatch.setattr(notification_manager, "dispatch", lambda n: seen.append(n))
    return seen


def test_get_reader_claims_slides_and_declines_others(tmp_path) -> None:
    assert napari_get_reader(str(tmp_path / "a.svs")) is not None
    assert napari_get_reader([str(tmp_path / "a.ndpi"), str(tmp_path / "b.tif")]) is not None
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path)) is None


def test_open_real_svs_gives_multiscale_layer_with_micron_scale(make_napari_viewer) -> None:
    path = real_file("slides/cmu_small_region.svs")
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(path), plugin=PLUGIN)
    assert layer.multiscale and layer.rgb
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert str(layer.units[0]) == "micrometer"
    meta = layer.metadata
    assert meta["vendor"] == "aperio" and meta["backend"] == "openslide"
    assert (meta["width"], meta["height"]) == (2220, 2967)
    assert meta["objective_power"] == 20 and meta["path"] == str(path)
    assert meta["level_downsamples"] == [1.0] and not meta["mpp_missing"]


def test_synthetic_slide_screenshot_is_not_blank(make_napari_viewer, synthetic_slide) -> None:
    viewer = make_napari_viewer(show=True)  # the GL canvas renders only once shown (on Xvfb)
    [layer] = viewer.open(str(synthetic_slide.slide_path), plugin=PLUGIN)
    assert len(layer.data) > 1
    assert tuple(layer.scale) == pytest.approx((0.5, 0.5), abs=1e-3)
    show_scale_bar(viewer)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    rgb = shot[..., :3].astype(float)
    assert rgb.std() > 10  # tissue and background, not a flat frame
    # pinkish tissue is present: red above green on a fair share of pixels
    assert ((rgb[..., 0] - rgb[..., 1]) > 20).mean() > 0.05


@pytest.mark.parametrize(
    ("name", "cause"),
    [("unopenable.tiff", "compression"), ("broken.svs", "corrupt"), ("unreadable.svs", "Bogus")],
)
def test_broken_files_notify_and_add_nothing(make_napari_viewer, notifications, name, cause) -> None:
    viewer = make_napari_viewer()
    path = real_file(f"slides/{name}")
    layers = viewer.open(str(path), plugin=PLUGIN)
    assert layers == [] and len(viewer.layers) == 0
    messages = [str(n.message) for n in notifications]
    assert any(name in m and cause in m for m in messages), messages
    # the viewer keeps working
    viewer.add_image(np.zeros((8, 8)))
    assert len(viewer.layers) == 1


def test_missing_mpp_warns_and_flags_metadata(make_napari_viewer, notifications) -> None:
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(real_file("slides/boxes.tiff")), plugin=PLUGIN)
    assert layer.metadata["mpp_missing"] is True
    assert tuple(layer.scale) == (1.0, 1.0)
    assert any("Slide panel" in str(n.message) for n in notifications)


def test_view_of_100k_slide_reads_only_visible_tiles(make_napari_viewer, qtbot) -> None:
    levels = procedural_levels(100_000)
    backend = InMemoryBackend(levels, mpp=0.25, tile_size=256)
    viewer = make_napari_viewer(show=True)
    data, kwargs, _ = slide_layer_data(Slide(backend))
    layer = viewer.add_image(data, **kwargs)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot[..., :3].std() > 10
    whole_view_reads = backend.read_count
    # the zoomed-out view needs the coarse level only: a few dozen tiles, not 150,000
    assert 0 < whole_view_reads <= 64
    # zoom to one level-0 field of 1000 x 1000 um around the centre
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center = (12_500, 12_500)
    camera.zoom = camera.zoom * 64
    viewer.screenshot(canvas_only=True, flash=False)
    qtbot.wait(50)
    assert layer.data_level < len(levels) - 1
    print("reads", whole_view_reads, backend.read_count - whole_view_reads, layer.data_level)
    assert backend.read_count - whole_view_reads <= 64


def test_manifest_is_discovered_by_npe2() -> None:
    from npe2 import PluginManager

    manager = PluginManager.instance()
    manager.discover()
    manifest = manager.get_manifest(PLUGIN)
    assert {w.display_name for w in manifest.contributions.widgets} >= {"Slide"}
    assert {s.key for s in manifest.contributions.sample_data} == {"synthetic-tumour", "synthetic-normal"}
    patterns = manifest.contributions.readers[0].filename_patterns
    assert {"*.svs", "*.ndpi", "*.mrxs", "*.tif", "*.png"} <= set(patterns)


def test_open_sample_synthetic_tumour(make_napari_viewer, monkeypatch) -> None:
    import napari_pathology._sample_data as sample_data

    monkeypatch.setattr(sample_data, "SAMPLE_SIZE", 2048)
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "synthetic-tumour")
    [layer] = viewer.layers
    assert layer.name == "synthetic tumour" and layer.multiscale
    assert layer.metadata["width"] == 2048
    assert tuple(layer.scale) == pytest.approx((0.5, 0.5), abs=1e-3)


def test_demo_viewer_has_slide_scale_bar_and_panel(make_napari_viewer, synthetic_slide) -> None:
    from napari_pathology._viewer import dock_panels, show_slide

    viewer = make_napari_viewer()
    [layer] = show_slide(viewer, synthetic_slide.slide_path)
    dock_panels(viewer)
    assert scale_bar(viewer).visible
    assert isinstance(viewer.window.dock_widgets["Slide (napari-pathology)"], SlidePanel)
    assert layer.metadata["path"] == str(synthetic_slide.slide_path)
