"""The slide runner: a whole-slide CNN over a slide, tile by tile, its class activation maps (no Qt)."""

from __future__ import annotations

import threading
from pathlib import Path

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
from napari_pathology.tissue import TissueMask, read_at_mpp

MPP = 4.0  # a 2048 px slide at 0.5 um/px: 256 x 256 px, an 8 x 8 activation map


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from napari_pathology.slide.synthetic import write_synthetic_slide

    out = tmp_path_factory.mktemp("wholeslide") / "slide.tif"
    return write_synthetic_slide(out, size=2048, seed=7).slide_path


def _model(
    classes=("normal", "tumour"), *, width: int = 4, input_size: int = 256, fixed: bool = False, mpp=MPP
) -> PathologyModel:
    spec = wholeslide_spec(
        "test-wholeslide", classes=classes, arch="resnet18", width=width, input_size=input_size, mpp=mpp
    )
    if fixed:  # trained on the tissue padded with white to input_size (what the trainer records)
        spec = spec.replace(config={**spec.config, "fixed_size": True})
    with torch.random.fork_rng(devices=[]):  # the same weights every time (the head too)
        torch.manual_seed(0)
        net = WholeSlideNet(len(classes), "resnet18", width)
    return PathologyModel(net.eval(), spec)


#: A tissue mask at 32 um/px over the 1,024 um slide: tissue at 160:240 x 144:200 px at 4 um/px, whose
#: box (its start snapped to the 32 px stride) is rows 160:240, columns 128:200: cells 5:8 x 4:7.
def _tissue() -> TissueMask:
    mask = np.zeros((32, 32), bool)
    mask[20:30, 18:25] = True
    return TissueMask(mask, 32.0, (2048, 2048), (0.5, 0.5))


def _net_on(model: PathologyModel, image: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Logits and every class's CAM of the network on a whole uint8 image (no tiles)."""
    x = normalize_unit(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0, "imagenet")
    with torch.no_grad():
        fmap = model.net.features(x)
        cams = torch.stack([model.net.cam(fmap, k)[0] for k in range(len(model.spec.classes))])
        return model.net.head(fmap), cams.numpy()


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
    events, result = _drain(run(slide, model, tissue=_tissue()))
    done = np.isfinite(result.heatmap)
    assert result.heatmap.shape == (8, 8) and done.sum() == 9 and done[5:8, 4:7].all()
    grid = events[0].payload
    assert np.isfinite(result.heatmap[grid.cells[:, 0], grid.cells[:, 1]]).all()
    # only the box was run: its maps are the network's on the box read alone
    box = run_to_completion(read_at_mpp(slide, MPP))[160:240, 128:200]
    logits, cams = _net_on(model, box)
    np.testing.assert_allclose(result.class_heatmaps[:, 5:8, 4:7], cams, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.scores["tumour"], torch.softmax(logits, 1)[0, 1].item(), rtol=1e-5)
    assert result.provenance["crop_px"] == [160, 240, 128, 200] and result.provenance["input_px"] == [80, 72]
    assert result.provenance["padded_to"] == [80, 72] and result.provenance["pad_px"] == [0, 0]


def test_box_read_equals_the_crop_of_the_whole_read(small_slide: Path) -> None:
    slide = open_slide(small_slide)
    for mpp, box in ((MPP, (160, 240, 128, 200)), (3.3, (17, 201, 33, 250)), (0.5, (100, 1900, 5, 2048))):
        whole = run_to_completion(read_at_mpp(slide, mpp, max_pixels=None))
        part = run_to_completion(read_at_mpp(slide, mpp, box=box, max_pixels=None))
        r0, r1, c0, c1 = box
        np.testing.assert_array_equal(part, whole[r0:r1, c0:c1])


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
    outside = TissueMask(np.ones((4, 4), bool), 2000.0, (2048, 2048), (0.5, 0.5))  # tissue beyond 1 mm
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


def test_no_size_limit_only_the_memory_budget(small_slide: Path, monkeypatch) -> None:
    import napari_pathology.tissue as tissue_pkg
    from napari_pathology.tissue import resample

    slide, model = open_slide(small_slide), _model(width=2)
    expected = _net_on(model, run_to_completion(read_at_mpp(slide, MPP)))[1]
    # the reader's pixel limit, made lower than this slide at 4 um/px (256 x 256 = 65,536 px): it refuses ...
    monkeypatch.setitem(resample.read_at_mpp.__kwdefaults__, "max_pixels", 50_000)
    monkeypatch.setattr(resample, "MAX_MASK_PIXELS", 50_000)
    with pytest.raises(ValueError, match="too large"):
        run_to_completion(read_at_mpp(slide, MPP))
    # ... but the runner reads the box with no limit: the slide is not refused for its size
    _events, result = _drain(run_slide_analysis(slide, model, memory_gb=1.0))
    assert not result.partial and result.provenance["crop_px"] == [0, 256, 0, 256]
    np.testing.assert_allclose(result.class_heatmaps, expected, rtol=1e-4, atol=1e-5)
    monkeypatch.undo()

    # at full scale: 0.07 um/px makes the 1,024 um slide 14,629 x 14,629 px (214 Mpx, over the reader's
    # 200 Mpx default); the box is read with max_pixels=None once the budget holds it (the read is stubbed
    # and the run cancelled before its first tile, so no network runs over 214 Mpx here)
    assert 14_629**2 > resample.MAX_MASK_PIXELS
    big = _model(width=1, mpp=0.07)
    with pytest.raises(SlideMemoryError) as refused:
        _drain(run_slide_analysis(slide, big, memory_gb=0.5, tile=1024))
    message = str(refused.value)
    assert "\n" not in message and "0.07 um/px (14629 x 14629 px of tissue) needs 0.60 GiB" in message
    assert "more than the 0.50 GiB memory budget; raise the budget (memory_gb or" in message
    assert "draw a smaller tissue mask, or use a model trained at a larger um/px" in message
    calls = []

    def stub(slide, mpp, block=2048, **kw):
        calls.append((mpp, kw["box"], kw["max_pixels"], kw["out"].shape))
        return kw["out"]
        yield

    monkeypatch.setattr(tissue_pkg, "read_at_mpp", stub)
    stop = threading.Event()
    stop.set()
    _events, result = _drain(run_slide_analysis(slide, big, memory_gb=1.0, tile=1024, cancel=stop))
    assert calls == [(0.07, (0, 14_629, 0, 14_629), None, (14_629, 14_629, 3))]
    assert result.partial and result.heatmap.shape == (458, 458)


def test_fixed_size_pads_the_box_with_white_on_the_cell_grid(small_slide: Path) -> None:
    slide = open_slide(small_slide)
    model, plain = _model(fixed=True), _model()
    events, result = _drain(run_slide_analysis(slide, model, tissue=_tissue(), tile=64, memory_gb=2.0))
    # the 80 x 72 px box centred in 256 px of white: pads of 88 and 92 px, each to the nearest multiple of 32
    assert result.provenance["padded_to"] == [256, 256] and result.provenance["pad_px"] == [96, 96]
    assert result.provenance["input_px"] == [80, 72] and result.provenance["notes"] == []
    canvas = np.full((256, 256, 3), 255, np.uint8)
    canvas[96:176, 96:168] = run_to_completion(read_at_mpp(slide, MPP))[160:240, 128:200]
    logits, cams = _net_on(model, canvas)  # (8, 8) maps of the padded input
    probabilities = torch.softmax(logits, 1)[0].numpy()
    assert [result.scores["normal"], result.scores["tumour"]] == pytest.approx(probabilities, rel=1e-5)
    # the box's cells (5:8 x 4:7 of the slide) are the padded input's cells 3:6 x 3:6; nothing else is kept
    np.testing.assert_allclose(result.class_heatmaps[:, 5:8, 4:7], cams[:, 3:6, 3:6], rtol=1e-4, atol=1e-5)
    done = np.isfinite(result.class_heatmaps)
    assert done.sum() == 2 * 9 and done[:, 5:8, 4:7].all()
    blocks = [e.payload for e in events if isinstance(e.payload, HeatmapBlock)]
    cells = np.concatenate([b.cells for b in blocks])
    assert len(blocks) == 4 + 1 and set(map(tuple, cells)) == {
        (r, c) for r in range(5, 8) for c in range(4, 7)
    }
    assert result.tiles_done == result.tiles_total == 16  # every tile of the padded input ran
    # the grid is the unpadded run's: the same cells at the same centres in um
    _events, unpadded = _drain(run_slide_analysis(slide, plain, tissue=_tissue(), tile=64, memory_gb=2.0))
    assert result.cell_um == unpadded.cell_um and result.first_centre_um == unpadded.first_centre_um
    np.testing.assert_array_equal(done, np.isfinite(unpadded.class_heatmaps))
    assert events[0].payload.cells.tolist() == [[r, c] for r in range(5, 8) for c in range(4, 7)]
    assert not np.allclose(result.class_heatmaps[:, 5:8, 4:7], unpadded.class_heatmaps[:, 5:8, 4:7])
    x_um, y_um = result.detections[:, 0], result.detections[:, 1]  # CAM maxima: over the box only
    assert ((x_um > 128 * MPP) & (x_um < 224 * MPP) & (y_um > 160 * MPP) & (y_um < 256 * MPP)).all()


def test_fixed_size_smaller_than_the_box_runs_it_whole(small_slide: Path) -> None:
    slide, tissue = open_slide(small_slide), _tissue()
    _events, plain = _drain(run_slide_analysis(slide, _model(), tissue=tissue, tile=64, memory_gb=2.0))
    _events, whole = _drain(
        run_slide_analysis(slide, _model(input_size=64, fixed=True), tissue=tissue, tile=64, memory_gb=2.0)
    )
    np.testing.assert_allclose(whole.class_heatmaps, plain.class_heatmaps, rtol=1e-5, atol=1e-6)
    assert whole.scores == pytest.approx(plain.scores, rel=1e-6)
    assert whole.provenance["padded_to"] == [80, 72] and whole.provenance["pad_px"] == [0, 0]
    (note,) = whole.provenance["notes"]
    assert "72 x 80 px) is larger than the model's fixed 64 px input: run whole" in note
    # one axis longer (80 rows), one shorter (72 columns padded to 76: 2 px a side, snapped to 0 before)
    _events, mixed = _drain(
        run_slide_analysis(slide, _model(input_size=76, fixed=True), tissue=tissue, tile=64, memory_gb=2.0)
    )
    assert mixed.provenance["padded_to"] == [80, 76] and mixed.provenance["pad_px"] == [0, 0]
    assert len(mixed.provenance["notes"]) == 1
    canvas = np.full((80, 76, 3), 255, np.uint8)
    canvas[:, :72] = run_to_completion(read_at_mpp(slide, MPP))[160:240, 128:200]
    logits, cams = _net_on(mixed_model := _model(input_size=76, fixed=True), canvas)
    assert mixed_model.spec.config["fixed_size"] is True
    np.testing.assert_allclose(mixed.class_heatmaps[:, 5:8, 4:7], cams, rtol=1e-4, atol=1e-5)
    assert mixed.scores["tumour"] == pytest.approx(torch.softmax(logits, 1)[0, 1].item(), rel=1e-5)
