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
    with pytest.raises(TrainingError, match="raise the memory budget"):
        _run(_job(tiny_cohort, tmp_path / "b.pt", tile=None, memory_gb=1e-4, epochs=1))


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
