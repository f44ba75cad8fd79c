"""Training the whole-slide CNN on a slide table through the shared loop, tile by tile."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_pathology.cohort import SlideEntry, read_slide_table
from napari_pathology.families.wholeslide.streaming import stream_predict
from napari_pathology.families.wholeslide.train import WholeSlideTraining, read_slide_image, train_wholeslide
from napari_pathology.models.registry import load_checkpoint
from napari_pathology.training.events import TrainingError


def _job(table: Path, out: Path, **kw) -> WholeSlideTraining:
    settings = dict(
        arch="resnet18", width=2, imagenet=False, input_mpp=8.0, tile=128, accumulation=1, epochs=2,
        val_fraction=0.5, lr=1e-3, threads=2,
    )  # fmt: skip
    return WholeSlideTraining(table, out, **{**settings, **kw})


def _run(job: WholeSlideTraining) -> tuple[list, object]:
    events, gen = [], train_wholeslide(job)
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value


def test_read_slide_image_at_the_target_resolution(tiny_cohort: Path) -> None:
    entry = read_slide_table(tiny_cohort)[0]
    image = read_slide_image(entry, 8.0)
    assert image.dtype == np.uint8 and image.shape == (256, 256, 3)  # 4096 px at 0.5 um/px
    padded = read_slide_image(entry, 8.0, size=320)
    assert padded.shape == (320, 320, 3)
    assert (padded[:32] == 255).all() and (padded[:, -32:] == 255).all()  # white padding around
    np.testing.assert_array_equal(padded[32:288, 32:288], image)
    cropped = read_slide_image(entry, 8.0, size=128)
    np.testing.assert_array_equal(cropped, image[64:192, 64:192])


@pytest.mark.slow
def test_trains_validates_and_saves(tiny_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "wholeslide.pt"
    events, result = _run(_job(tiny_cohort, out))
    kinds = [e.kind for e in events]
    assert "validation" in kinds and kinds[-1] == "done"
    assert result.best == out and result.last is not None and result.step == 4  # 2 slides x 2 epochs
    validation = [e for e in events if e.kind == "validation"][-1].metrics
    assert {"val_loss", "val_accuracy", "val_auc"} <= set(validation)
    model = load_checkpoint(out)
    assert model.spec.family == "wholeslide" and model.spec.classes == ("normal", "tumour")
    x = torch.rand(1, 3, 200, 170)
    with torch.no_grad():
        logits, cams = stream_predict(model.net, x, 64)
        torch.testing.assert_close(logits, model.net(x), rtol=1e-4, atol=1e-5)
    assert cams.shape == (1, 2, 7, 6)


@pytest.mark.slow
def test_tile_from_the_memory_budget_and_its_refusal(tiny_cohort: Path, tmp_path: Path) -> None:
    _events, result = _run(_job(tiny_cohort, tmp_path / "a.pt", tile=None, memory_gb=2.0, epochs=1))
    assert result.step == 2
    with pytest.raises(TrainingError, match=r"synthetic-\d+-\w+\.tif at 8 um/px: .*raise the memory budget"):
        _run(_job(tiny_cohort, tmp_path / "b.pt", tile=None, memory_gb=1e-4, epochs=1))
    assert not (tmp_path / "b.pt").exists()  # refused before any training


def test_bad_tables_and_settings(tiny_cohort: Path, tmp_path: Path) -> None:
    entries = read_slide_table(tiny_cohort)
    table = tmp_path / "one-class.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "label"])
        for entry in entries:
            writer.writerow([str(entry.path), "normal"])
    with pytest.raises(TrainingError, match="one class"):
        _run(_job(table, tmp_path / "m.pt"))
    with pytest.raises(TrainingError, match="accumulation"):
        _run(_job(tiny_cohort, tmp_path / "n.pt", accumulation=4))
    for kw, message in (
        ({"tile": 100}, "multiple of 32"),
        ({"width": 65}, "width"),
        ({"arch": "vgg"}, "arch"),
        ({"classes": ("normal",)}, "classes"),
        ({"input_mpp": 0.0}, "input_mpp"),
    ):
        with pytest.raises(TrainingError, match=message):
            _job(tiny_cohort, tmp_path / "x.pt", **kw)


def test_slide_without_mpp_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "plain.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(path)
    with pytest.raises(TrainingError, match="um/px"):
        read_slide_image(SlideEntry(path, "normal"), 2.5)


def _stopping_at_first_validation(job: WholeSlideTraining) -> tuple[list, object]:
    import threading

    stop, events = threading.Event(), []
    gen = train_wholeslide(job, stop)
    while True:
        try:
            event = next(gen)
        except StopIteration as done:
            return events, done.value
        events.append(event)
        if event.kind == "validation":
            stop.set()


@pytest.mark.slow
def test_stop_then_resume_reads_slides_from_the_cache(tiny_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "ws.pt"
    _events, stopped = _stopping_at_first_validation(_job(tiny_cohort, out, input_size=288))
    assert stopped.stopped and stopped.step == 2 and stopped.last is not None and out.exists()
    cache = tmp_path / "ws.slides-cache"
    files = sorted(cache.glob("*.npy"))
    assert len(files) == 4 and all(np.load(f, mmap_mode="r").shape == (288, 288, 3) for f in files)
    stamps = [f.stat().st_mtime_ns for f in files]
    _events, result = _run(_job(tiny_cohort, out, input_size=288, resume=True))
    assert result.step == 4 and not result.stopped
    assert sorted(cache.glob("*.npy")) == files and [f.stat().st_mtime_ns for f in files] == stamps
    model = load_checkpoint(out)
    assert model.spec.config["fixed_size"] is True and model.spec.input_size == 288


@pytest.mark.slow
def test_a_crash_mid_epoch_loses_nothing_and_resumes(tiny_cohort: Path, tmp_path: Path, monkeypatch) -> None:
    from napari_pathology.families.wholeslide import train as module

    calls = {"n": 0}
    real = module.stream_trunk

    def crashing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # 2 steps and 2 validation slides done: the third step crashes
            raise RuntimeError("power cut")
        return real(*args, **kw)

    monkeypatch.setattr(module, "stream_trunk", crashing)
    out = tmp_path / "ws.pt"
    with pytest.raises(RuntimeError, match="power cut"):
        _run(_job(tiny_cohort, out, cache_gb=0))
    saved = torch.load(out.with_name("ws.last.pt"), weights_only=False)
    assert out.exists() and saved["provenance"]["step"] == 2
    assert not (tmp_path / "ws.slides-cache").exists()  # cache_gb 0: nothing kept
    _events, result = _run(_job(tiny_cohort, out, cache_gb=0, resume=True))
    assert result.step == 4


@pytest.mark.slow
def test_out_of_memory_halves_the_tile_then_says_so(tiny_cohort: Path, tmp_path: Path, monkeypatch) -> None:
    from napari_pathology.families.wholeslide import train as module

    tiles = []
    real = module.stream_trunk

    def small_memory(stages, x, tile, **kw):
        tiles.append(tile)
        if tile[0] > 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(stages, x, tile, **kw)

    monkeypatch.setattr(module, "stream_trunk", small_memory)
    events, result = _run(_job(tiny_cohort, tmp_path / "ws.pt", epochs=1))
    assert result.step == 2 and tiles[0] == (128, 128) and set(tiles[1:]) == {(64, 64)}
    assert any("tiles halved (64 px)" in e.message for e in events if e.kind == "log")
    monkeypatch.setattr(
        module, "stream_trunk", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory"))
    )
    with pytest.raises(TrainingError, match="out of memory"):
        _run(_job(tiny_cohort, tmp_path / "b.pt", epochs=1))


def test_slides_of_other_sizes_in_one_batch_are_each_seen_as_they_are() -> None:
    from napari_pathology.families.wholeslide.model import wholeslide_spec
    from napari_pathology.families.wholeslide.train import _Forward, _stack
    from napari_pathology.models.registry import create_model
    from napari_pathology.tiles.tensors import normalize_uint8

    rng = np.random.default_rng(0)
    small = rng.integers(0, 200, (96, 70, 3), dtype=np.uint8)
    large = rng.integers(0, 200, (130, 150, 3), dtype=np.uint8)
    model = create_model(wholeslide_spec("t", arch="resnet18", width=2)).eval()
    forward = _Forward(WholeSlideTraining(Path("t.csv"), Path("o.pt"), tile=64, arch="resnet18", width=2))
    with torch.no_grad():
        both = forward(model, _stack([small, large]))
        alone = torch.cat([forward(model, _stack([small])), forward(model, _stack([large]))])
        padded = model.net(normalize_uint8(_stack([small, large])[:1], "imagenet"))
    torch.testing.assert_close(both, alone)
    assert not torch.allclose(both[:1], padded, atol=1e-6)  # the white margin would have changed it
