"""The engine end to end with models whose output is a known function of the pixels."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from napari_pathology._layers import overlay_geometry
from napari_pathology.analysis import NoTissueError, RunSettings, load_result, run_analysis
from napari_pathology.analysis.engine import FIRST_BATCH, first_batches
from napari_pathology.models import ModelSpec, PathologyModel
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import InMemoryBackend, Slide
from napari_pathology.tiles import TileGrid

SQUARE = (768, 512, 1280, 1024)  # x0, y0, x1, y1 in level-0 px (1 um/px)


class DarkFraction(nn.Module):
    """Tumour probability = fraction of dark pixels in the tile (exact, no training)."""

    def __init__(self, max_batch: int | None = None) -> None:
        super().__init__()
        self.calls = 0
        self.tiles_seen = 0
        self.max_batch = max_batch
        self.register_buffer("dark_level", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_batch is not None and len(x) > self.max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        self.calls += 1
        self.tiles_seen += len(x)
        frac = (x.mean(1) < self.dark_level).float().mean((1, 2)).clamp(1e-6, 1 - 1e-6)
        return torch.stack([torch.log(1 - frac), torch.log(frac)], 1)


def dark_model(**kwargs) -> PathologyModel:
    spec = ModelSpec(
        name="test-dark-fraction", family="test", task="test", classes=("normal", "tumour"),
        input_size=32, mpp=2.0, stride=32, normalization="unit", aggregator="max", tta=True,
    )  # fmt: skip
    return PathologyModel(DarkFraction(**kwargs), spec)


@pytest.fixture
def planted_slide() -> Slide:
    image = np.full((2048, 2048, 3), (230, 180, 200), np.uint8)  # pink "tissue" everywhere
    x0, y0, x1, y1 = SQUARE
    image[y0:y1, x0:x1] = (60, 30, 90)  # the planted dark region
    half = image[::2, ::2].copy()
    return Slide(InMemoryBackend([image, half], mpp=1.0, tile_size=256))


def run(slide, model, **kwargs):
    events = []
    result = run_to_completion(run_analysis(slide, model, **kwargs), events.append)
    return result, events


def test_heatmap_lights_up_exactly_the_planted_region_in_world_coordinates(planted_slide) -> None:
    result, events = run(planted_slide, dark_model(), settings=RunSettings(batch_size=64))
    assert isinstance(events[0].payload, TileGrid)
    assert result.heatmap.shape == (32, 32) and result.cell_um == 64.0
    expected = np.zeros((32, 32), bool)
    expected[8:16, 12:20] = True  # rows from y 512..1024, cols from x 768..1280 at 64 um per cell
    np.testing.assert_array_equal(result.heatmap > 0.5, expected)
    assert result.slide_score == pytest.approx(1.0, abs=1e-4)
    # the napari overlay puts cell centres on the planted pixels of the slide layer (scale 1 um/px)
    geometry = overlay_geometry(result.cell_um, result.first_centre_um, planted_slide.mpp)
    rows, cols = np.nonzero(expected)
    world_y = geometry["translate"][0] + rows * geometry["scale"][0]
    world_x = geometry["translate"][1] + cols * geometry["scale"][1]
    x0, y0, x1, y1 = SQUARE
    assert ((world_x >= x0) & (world_x < x1) & (world_y >= y0) & (world_y < y1)).all()
    # detections (NMS) fall inside the planted square, in physical micrometres
    assert len(result.detections) >= 1
    x, y, score = result.detections[0]
    assert x0 <= x < x1 and y0 <= y < y1 and score > 0.99


def test_tta_averages_orientations(planted_slide) -> None:
    plain, _ = run(planted_slide, dark_model(), settings=RunSettings(tta=False))
    tta, _ = run(planted_slide, dark_model(), settings=RunSettings(tta=True))
    np.testing.assert_allclose(plain.heatmap, tta.heatmap, atol=1e-5)  # rotation-invariant model
    assert tta.provenance["tta"] and not plain.provenance["tta"]


def test_cancel_keeps_finished_tiles_and_a_rerun_resumes(planted_slide, tmp_path) -> None:
    cancel = threading.Event()
    model = dark_model()
    settings = RunSettings(batch_size=100, tta=False)
    job = run_analysis(planted_slide, model, settings=settings, out_dir=tmp_path, cancel=cancel)
    next(job)  # grid
    next(job)  # first block: the small first batch (FIRST_BATCH tiles), shown within a second or two
    cancel.set()
    partial = run_to_completion(job)
    assert partial.partial and partial.tiles_done == FIRST_BATCH and partial.tiles_total == 1024
    assert load_result(tmp_path).partial
    resumed_model = dark_model()
    resumed, _ = run(
        planted_slide, resumed_model, settings=RunSettings(batch_size=100, tta=False), out_dir=tmp_path
    )
    assert not resumed.partial and resumed_model.net.tiles_seen == 1024 - FIRST_BATCH
    again_model = dark_model()
    again, events = run(
        planted_slide, again_model, settings=RunSettings(batch_size=100, tta=False), out_dir=tmp_path
    )
    assert events[-1].message == "reloaded saved result" and again_model.net.calls == 0
    np.testing.assert_array_equal(again.heatmap, resumed.heatmap)


def test_closing_the_generator_saves_a_partial_result(planted_slide, tmp_path) -> None:
    job = run_analysis(planted_slide, dark_model(), settings=RunSettings(batch_size=50), out_dir=tmp_path)
    next(job)
    next(job)
    job.close()
    saved = load_result(tmp_path)
    assert saved.partial and saved.tiles_done == FIRST_BATCH


def test_out_of_memory_retries_with_smaller_batches(planted_slide) -> None:
    result, _ = run(planted_slide, dark_model(max_batch=4), settings=RunSettings(batch_size=32))
    assert not result.partial
    assert any("batch size 4" in note for note in result.provenance["notes"])


def test_no_tissue_is_a_clear_error(planted_slide) -> None:
    class Empty:
        mask = np.zeros((64, 64), bool)
        mpp = 32.0

    with pytest.raises(NoTissueError, match="No tissue"):
        run(planted_slide, dark_model(), tissue=Empty())


def test_slide_without_mpp_is_refused() -> None:
    slide = Slide(InMemoryBackend([np.zeros((256, 256, 3), np.uint8)]))
    with pytest.raises(Exception, match="um/px"):
        run(slide, dark_model())


def test_engine_refuses_a_nucleus_classifier(synthetic_slide) -> None:
    from napari_pathology.analysis import run_analysis
    from napari_pathology.models import resolve_model
    from napari_pathology.slide import open_slide

    model = resolve_model("nucleus-purity")
    with open_slide(synthetic_slide.slide_path) as slide, pytest.raises(ValueError, match="not tiles"):
        next(run_analysis(slide, model))


def test_first_batches_ramp_up_to_the_batch_size(planted_slide) -> None:
    assert first_batches(1000, 32) == [4, 8, 16]
    assert first_batches(6, 32) == [4, 2] and first_batches(0, 32) == [] and first_batches(100, 4) == []
    _, events = run(planted_slide, dark_model(), settings=RunSettings(batch_size=32, tta=False))
    sizes = [len(e.payload.cells) for e in events if type(e.payload).__name__ == "HeatmapBlock"]
    assert sizes[:4] == [4, 8, 16, 32] and sum(sizes) == events[-1].total


def test_cancel_on_the_cpu_stops_within_a_batch_keeping_its_finished_tiles(planted_slide) -> None:
    cancel = threading.Event()
    model = dark_model()
    net = model.net
    forward = net.forward

    def pressed_during_the_fourth_call(x):
        out = forward(x)
        if net.calls == 4:  # 4 tiles into the third batch (16 tiles): Cancel pressed
            cancel.set()
        return out

    net.forward = pressed_during_the_fourth_call
    settings = RunSettings(batch_size=32, tta=False, device="cpu")
    result, _ = run(planted_slide, model, settings=settings, cancel=cancel)
    assert result.partial and result.tiles_done == 4 + 8 + 4 and net.tiles_seen == 16
    assert np.isfinite(result.heatmap).sum() == 16
