"""The engine under faults: NaN models, interrupts inside the run, periodic saves, real causes first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_pathology.analysis import (
    HeatmapBlock,
    ModelOutputError,
    NoTissueError,
    RunSettings,
    check_run,
    load_result,
    run_analysis,
)
from napari_pathology.analysis.engine import first_batches
from napari_pathology.models import ModelSpec, PathologyModel
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import InMemoryBackend, Slide


class Scripted(nn.Module):
    """Dark-pixel share as tumour probability; NaN after ``nan_after`` tiles, Ctrl-C after ``stop_after``."""

    def __init__(self, nan_after: int | None = None, stop_after: int | None = None) -> None:
        super().__init__()
        self.tiles_seen = 0
        self.nan_after, self.stop_after = nan_after, stop_after
        self.register_buffer("dark_level", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stop_after is not None and self.tiles_seen >= self.stop_after:
            raise KeyboardInterrupt  # what Ctrl-C or the CLI's SIGTERM handler raise mid-forward
        self.tiles_seen += len(x)
        frac = (x.mean(1) < self.dark_level).float().mean((1, 2)).clamp(1e-6, 1 - 1e-6)
        logits = torch.stack([torch.log(1 - frac), torch.log(frac)], 1)
        if self.nan_after is not None and self.tiles_seen > self.nan_after:
            logits = logits * float("nan")
        return logits


def model(**kwargs) -> PathologyModel:
    spec = ModelSpec(
        name="test-scripted", family="test", task="test", classes=("normal", "tumour"), input_size=32,
        mpp=2.0, stride=32, normalization="unit", aggregator="max", tta=False,
    )  # fmt: skip
    return PathologyModel(Scripted(**kwargs), spec)


@pytest.fixture
def slide() -> Slide:
    image = np.full((1024, 1024, 3), (230, 180, 200), np.uint8)
    image[256:512, 384:640] = (60, 30, 90)
    return Slide(InMemoryBackend([image], mpp=1.0, tile_size=256))  # 16 x 16 tiles of the test model


SETTINGS = RunSettings(batch_size=16, workers=0)
#: Tiles done after each block of a 256-tile run at batch size 16 (the engine's ramp 4, 8, then 16s).
BLOCKS = [int(b) for b in np.cumsum([*first_batches(256, 16), *[16] * 16]) if b <= 256]


def test_nan_outputs_are_an_error_naming_the_model_and_nothing_is_saved(slide, tmp_path) -> None:
    out = tmp_path / "res"
    with pytest.raises(ModelOutputError, match=r"model test-scripted produced NaN outputs .*weights.*broken"):
        run_to_completion(run_analysis(slide, model(nan_after=0), settings=SETTINGS, out_dir=out))
    assert not (out / "result.json").exists()  # no partial result that every rerun would "resume"
    # NaN after some good blocks (saved every block): the error again, never a "complete" result
    settings = RunSettings(batch_size=16, workers=0, save_every_s=0)
    with pytest.raises(ModelOutputError):
        run_to_completion(run_analysis(slide, model(nan_after=64), settings=settings, out_dir=out))
    kept = load_result(out)
    assert kept.partial and kept.tiles_done == max(b for b in BLOCKS if b <= 64)  # the blocks before NaN
    with pytest.raises(ModelOutputError):  # the rerun resumes the good tiles, then says the same
        run_to_completion(run_analysis(slide, model(nan_after=0), settings=settings, out_dir=out))


def test_partial_results_are_saved_as_blocks_finish(slide, tmp_path) -> None:
    out = tmp_path / "res"
    settings = RunSettings(batch_size=16, workers=0, save_every_s=0)
    job = run_analysis(slide, model(), settings=settings, out_dir=out)
    next(job)  # grid
    seen = []
    for _ in range(3):
        next(job)
        seen.append(load_result(out).tiles_done)  # on disk while the run goes on, no cancel, no close
    assert seen == BLOCKS[:3]
    del job  # the process "dies" here: no close, no finally that saves
    resumed_model = model()
    events = []
    result = run_to_completion(
        run_analysis(slide, resumed_model, settings=settings, out_dir=out), events.append
    )
    assert not result.partial and resumed_model.net.tiles_seen == 256 - BLOCKS[2]
    # a resumed run shows the kept cells at once, right after the grid
    assert events[0].done == BLOCKS[2] and isinstance(events[1].payload, HeatmapBlock)
    assert len(events[1].payload.cells) == BLOCKS[2]


def test_the_default_interval_saves_nothing_mid_run_for_a_short_run(slide, tmp_path) -> None:
    out = tmp_path / "res"
    job = run_analysis(slide, model(), settings=SETTINGS, out_dir=out)
    next(job)
    next(job)
    assert not (out / "result.json").exists()  # 30 s have not passed
    run_to_completion(job)
    assert not load_result(out).partial


def test_ctrl_c_inside_the_model_still_saves_the_finished_tiles(slide, tmp_path) -> None:
    out = tmp_path / "res"
    with pytest.raises(KeyboardInterrupt):
        run_to_completion(run_analysis(slide, model(stop_after=BLOCKS[3]), settings=SETTINGS, out_dir=out))
    kept = load_result(out)
    assert kept.partial and kept.tiles_done == BLOCKS[3] and kept.provenance["cancelled"]
    resumed = model()
    run_to_completion(run_analysis(slide, resumed, settings=SETTINGS, out_dir=out))
    assert resumed.net.tiles_seen == 256 - BLOCKS[3]


def test_an_interrupt_before_any_tile_saves_nothing(slide, tmp_path) -> None:
    out = tmp_path / "res"
    with pytest.raises(KeyboardInterrupt):
        run_to_completion(run_analysis(slide, model(stop_after=0), settings=SETTINGS, out_dir=out))
    assert not (out / "result.json").exists()


def test_the_real_cause_is_said_before_no_tissue(slide) -> None:
    class NoTissue:
        mask = np.zeros((32, 32), bool)
        mpp = 32.0

    spec = model().spec
    with pytest.raises(ValueError, match=r"stride 4096 px .* is larger than .*at most 512 px"):
        run_to_completion(run_analysis(slide, model(), tissue=NoTissue(), settings=RunSettings(stride=4096)))
    fine = Slide(InMemoryBackend([np.zeros((64, 64, 3), np.uint8)], mpp=1e-6))
    with pytest.raises(ValueError, match=r"1e-06 um/px is implausible for test-scripted"):
        check_run(fine, spec)
    coarse = Slide(InMemoryBackend([np.zeros((64, 64, 3), np.uint8)], mpp=8.0))
    with pytest.raises(ValueError, match=r"test-scripted needs 2 um/px but .* has at best 8 um/px"):
        check_run(coarse, spec)
    tiny = Slide(InMemoryBackend([np.zeros((16, 16, 3), np.uint8)], mpp=1.0))
    with pytest.raises(ValueError, match="smaller than half of one test-scripted tile"):
        check_run(tiny, spec)
    with pytest.raises(NoTissueError, match="No tissue"):  # only when the rest is right
        run_to_completion(run_analysis(slide, model(), tissue=NoTissue(), settings=SETTINGS))
