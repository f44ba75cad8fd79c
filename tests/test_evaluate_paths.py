"""``evaluate`` on slides that share a file name: separate results, rows told apart by path."""

from __future__ import annotations

import csv
import json

import numpy as np
import torch
from PIL import Image
from torch import nn

from napari_pathology.analysis import RunSettings, load_result
from napari_pathology.analysis.evaluate import evaluate_cohort
from napari_pathology.cohort import SlideEntry
from napari_pathology.models import ModelSpec, PathologyModel
from napari_pathology.progress import run_to_completion


class DarkFraction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("dark_level", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frac = (x.mean(1) < self.dark_level).float().mean((1, 2)).clamp(1e-6, 1 - 1e-6)
        return torch.stack([torch.log(1 - frac), torch.log(frac)], 1)


def test_same_named_slides_from_two_folders_keep_separate_results_and_rows(tmp_path) -> None:
    entries = []
    for folder, label, dark in (("site-a", "tumour", True), ("site-b", "normal", False)):
        image = np.full((512, 512, 3), (230, 180, 200), np.uint8)
        if dark:
            image[128:384, 128:384] = (60, 30, 90)
        path = tmp_path / folder / "case.png"
        path.parent.mkdir()
        Image.fromarray(image).save(path)
        entries.append(SlideEntry(path, label, mpp=1.0))
    spec = ModelSpec(
        name="test-dark", family="test", task="test", classes=("normal", "tumour"), input_size=32, mpp=2.0,
        stride=32, normalization="unit", aggregator="max", tta=False,
    )  # fmt: skip
    out = tmp_path / "eval"
    model = PathologyModel(DarkFraction(), spec)
    evaluation = run_to_completion(evaluate_cohort(model, entries, out, RunSettings(batch_size=32)))
    first, second = evaluation.outcomes
    assert first.result_dir != second.result_dir
    assert load_result(first.result_dir).slide_score > 0.99 > load_result(second.result_dir).slide_score
    with open(out / "slides-test-dark.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == [str(e.path) for e in entries]
    summary = json.loads((out / "evaluation-test-dark.json").read_text())
    assert [row["path"] for row in summary["slides"]] == [str(e.path) for e in entries]


def test_a_slide_without_a_label_is_named_not_silently_left_out_of_the_auc(tmp_path) -> None:
    entries = []
    for name, label in (("a", "tumour"), ("b", "normal"), ("c", None)):
        path = tmp_path / f"{name}.png"
        Image.fromarray(np.full((256, 256, 3), (230, 180, 200), np.uint8)).save(path)
        entries.append(SlideEntry(path, label, mpp=1.0))
    spec = ModelSpec(
        name="test-dark", family="test", task="test", classes=("normal", "tumour"), input_size=32, mpp=2.0,
        stride=32, normalization="unit", aggregator="max", tta=False,
    )  # fmt: skip
    model = PathologyModel(DarkFraction(), spec)
    evaluation = run_to_completion(evaluate_cohort(model, entries, tmp_path / "eval", RunSettings()))
    assert any("1 of 3 slides" in note and "c.png" in note for note in evaluation.notes), evaluation.notes
    assert "not in the slide AUC" in evaluation.summary()


def test_a_slide_that_cannot_be_read_is_named_and_the_others_are_scored(tmp_path, capsys) -> None:
    from napari_pathology.cli import main

    rows = ["slide,label,mpp"]
    for name, label, colour in (("a", "tumour", (60, 30, 90)), ("b", "normal", (230, 180, 200))):
        path = tmp_path / f"{name}.png"
        Image.fromarray(np.full((256, 256, 3), colour, np.uint8)).save(path)
        rows.append(f"{path},{label},1.0")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows.append(f"{broken},tumour,1.0")
    table = tmp_path / "slides.csv"
    table.write_text("\n".join(rows) + "\n")
    out = tmp_path / "eval"
    words = ["evaluate", "--model", "nuclear-density", "--data", str(table), "--out", str(out), "--quiet"]
    assert main(words) == 1  # the others are still scored and written
    printed = capsys.readouterr().out
    assert "1 of 3 slides failed and are not scored: broken.png (" in printed
    summary = json.loads((out / "evaluation-nuclear-density.json").read_text())
    assert [row["slide"] for row in summary["slides"]] == ["a", "b"]
    assert len(summary["failed"]) == 1 and summary["failed"][0].startswith("broken.png (")
