"""The slide runner: a whole-slide CNN over a slide, tile by tile, its class activation maps (no Qt)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from napari_pathology.analysis import load_result
from napari_pathology.analysis.engine import HeatmapBlock
from napari_pathology.analysis.runners import run
from napari_pathology.analysis.settings import NoTissueError
from napari_pathology.analysis.wholeslide import TOP_K, SlideMemoryError, run_slide_analysis
from napari_pathology.families.wholeslide.model import WholeSlideNet, wholeslide_spec
from napari_pathology.models.registry import PathologyModel
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import open_slide
from napari_pathology.tiles import TileGrid
from napari_pathology.tiles.tensors import normalize_unit
from napari_pathology.tissue import read_at_mpp

MPP = 4.0  # a 2048 px slide at 0.5 um/px: 256 x 256 px, an 8 x 8 activation map


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_pathology.slide.synthetic import write_synthetic_slide

    out = tmp_path_factory.mktemp("wholeslide") / "slide.tif"
    return write_synthetic_slide(out, size=2048, seed=7).slide_path


def _model(classes=("normal", "tumour")) -> PathologyModel:
    spec = wholeslide_spec(
        "test-wholeslide", classes=classes, arch="resnet18", width=4, input_size=256, mpp=MPP
    )
    return PathologyModel(WholeSlideNet(len(classes), "resnet18", 4).eval(), spec)


def _drain(gen):
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as done:
            return events, done.value


def _whole_image_cams(slide, model: PathologyModel) -> np.ndarray:
    image = run_to_completion(read_at_mpp(slide, MPP))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    x = normalize_unit(x, "imagenet")
    with torch.no_grad():
        fmap = model.net.features(x)
        return torch.stack([model.net.cam(fmap, k)[0] for k in range(2)]).numpy()


def test_activation_result_equals_the_whole_image_cam(small_slide: Path, tmp_path: Path) -> None:
    slide, model = open_slide(small_slide), _model()
    events, result = _drain(run_slide_analysis(slide, model, out_dir=tmp_path / "r", tile=64, memory_gb=2.0))
    assert isinstance(events[0].payload, TileGrid) and events[0].payload.shape == (8, 8)
    blocks = [e.payload for e in events if isinstance(e.payload, HeatmapBlock)]
    assert len(blocks) == 16 + 1 and all(b.kind == "activation" for b in blocks)  # a block per tile, then all
    assert result.heatmap_kind == "activation" and not result.partial and result.unit == "tiles"
    assert result.heatmap.shape == (8, 8) and result.class_heatmaps.shape == (2, 8, 8)
    assert result.cell_um == pytest.approx(32 * MPP) and result.tiles_done == result.tiles_total == 16
    expected = _whole_image_cams(slide, model)
    np.testing.assert_allclose(result.class_heatmaps, expected, rtol=1e-4, atol=1e-5)
    predicted = int(np.argmax([result.scores["normal"], result.scores["tumour"]]))
    np.testing.assert_array_equal(result.heatmap, result.class_heatmaps[predicted])
    assert sum(result.scores.values()) == pytest.approx(1.0, abs=1e-6)
    assert result.score_name == "P(tumour)" and result.slide_score == pytest.approx(result.scores["tumour"])
    # detections: CAM maxima at cell centres, scored by the map
    assert 1 <= len(result.detections) <= TOP_K
    assert result.detections[0, 2] == pytest.approx(np.nanmax(result.heatmap))
    cols = np.rint((result.detections[:, 0] - 16 * MPP) / result.cell_um).astype(int)
    rows = np.rint((result.detections[:, 1] - 16 * MPP) / result.cell_um).astype(int)
    np.testing.assert_allclose(result.heatmap[rows, cols], result.detections[:, 2], rtol=1e-5)
    assert result.provenance["tile_px"] == 64 and result.provenance["input_px"] == [256, 256]
    # the tile the budget picks gives the same maps; saved, reloaded, and a rerun reloads
    _events, chosen = _drain(run_slide_analysis(slide, model, memory_gb=2.0))
    np.testing.assert_allclose(chosen.class_heatmaps, result.class_heatmaps, rtol=1e-4, atol=1e-5)
    again = load_result(tmp_path / "r")
    np.testing.assert_array_equal(again.class_heatmaps, result.class_heatmaps)
    assert again.heatmap_kind == "activation" and again.scores == result.scores
    events, _ = _drain(run_slide_analysis(slide, model, out_dir=tmp_path / "r", tile=64, memory_gb=2.0))
    assert any(e.message == "reloaded saved result" for e in events)


def test_family_dispatch_and_tissue_crop(small_slide: Path) -> None:
    slide, model = open_slide(small_slide), _model()
    mask = np.zeros((32, 32), bool)  # 32 um/px over the 1,024 um slide: tissue lower right
    mask[20:30, 18:25] = True  # 160:240 x 144:200 px at 4 um/px: cells 5:8 x 4:7
    events, result = _drain(run(slide, model, tissue=SimpleNamespace(mask=mask, mpp=32.0)))
    done = np.isfinite(result.heatmap)
    assert result.heatmap.shape == (8, 8) and done.sum() == 9 and done[5:8, 4:7].all()
    grid = events[0].payload
    assert np.isfinite(result.heatmap[grid.cells[:, 0], grid.cells[:, 1]]).all()


def test_cancel_returns_a_saved_partial_result(small_slide: Path, tmp_path: Path) -> None:
    slide, model, stop = open_slide(small_slide), _model(), threading.Event()
    stop.set()
    _events, result = _drain(
        run_slide_analysis(slide, model, out_dir=tmp_path / "q", tile=64, memory_gb=2.0, cancel=stop)
    )
    assert result.partial and result.tiles_done == 0 and np.isnan(result.slide_score)
    stop2 = threading.Event()
    gen = run_slide_analysis(slide, model, out_dir=tmp_path / "p", tile=64, memory_gb=2.0, cancel=stop2)
    seen = 0
    while True:
        try:
            event = next(gen)
        except StopIteration as done:
            result = done.value
            break
        if isinstance(event.payload, HeatmapBlock):
            seen += 1
            if seen == 3:
                stop2.set()
    assert result.partial and result.tiles_done == 3 and result.tiles_total == 16
    assert np.isfinite(result.heatmap).sum() == 3 * 4  # 3 tiles of 2 x 2 cells
    saved = load_result(tmp_path / "p")
    assert saved.partial and saved.tiles_done == 3
    # a partial result is not reused: the rerun computes everything
    _events, full = _drain(run_slide_analysis(slide, model, out_dir=tmp_path / "p", tile=64, memory_gb=2.0))
    assert not full.partial and np.isfinite(full.heatmap).all()


def test_bad_input_gets_one_line(small_slide: Path, tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    from napari_pathology.slide.backends.errors import SlideOpenError

    slide, model = open_slide(small_slide), _model()
    with pytest.raises(SlideMemoryError, match=r"memory budget.*raise the budget"):
        _drain(run_slide_analysis(slide, model, memory_gb=1e-4))
    monkeypatch.setenv("NAPARI_PATHOLOGY_SLIDE_MEMORY_GB", "lots")
    with pytest.raises(ValueError, match="NAPARI_PATHOLOGY_SLIDE_MEMORY_GB must be a positive"):
        _drain(run_slide_analysis(slide, model))
    monkeypatch.delenv("NAPARI_PATHOLOGY_SLIDE_MEMORY_GB")
    outside = SimpleNamespace(mask=np.ones((4, 4), bool), mpp=2000.0)  # 8 mm of mask: tissue beyond 1 mm
    outside.mask[:2] = False
    with pytest.raises(NoTissueError, match="outside the slide"):
        _drain(run_slide_analysis(slide, model, tissue=outside, memory_gb=2.0))
    path = tmp_path / "plain.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(path)
    with pytest.raises(SlideOpenError, match="um/px"):
        _drain(run_slide_analysis(open_slide(path), model))


def test_out_of_memory_retries_with_a_smaller_tile(small_slide: Path, monkeypatch) -> None:
    slide, model = open_slide(small_slide), _model()
    real, tiles = WholeSlideNet.predict_tiles, []

    def fake(self, image, tile, **kw):
        tiles.append(tile)
        if tile > 64:

            def boom():
                raise torch.OutOfMemoryError("CUDA out of memory")
                yield

            return boom()
        return real(self, image, tile, **kw)

    monkeypatch.setattr(WholeSlideNet, "predict_tiles", fake)
    events, result = _drain(run_slide_analysis(slide, model, tile=256, memory_gb=2.0))
    assert tiles == [256, 128, 64] and not result.partial and result.provenance["tile_px"] == 64
    assert any("retrying with 64 px tiles" in e.message for e in events)
    tiles.clear()
    monkeypatch.setattr(
        WholeSlideNet, "predict_tiles", lambda self, image, tile, **kw: fake(self, image, 1024)
    )
    with pytest.raises(SlideMemoryError, match=r"out of memory .* even with a 64 px tile"):
        _drain(run_slide_analysis(slide, model, tile=256, memory_gb=2.0))
