"""The wholeslide family in the program: registry, ``train`` CLI, ``run`` CLI and the Train panel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _main(args: list[str]) -> int:
    from napari_pathology.cli import main

    try:
        return main(args)
    except SystemExit as done:  # argparse's --help
        return int(done.code or 0)


def test_the_family_is_registered() -> None:
    from napari_pathology.families import get_family, list_families

    family = get_family("wholeslide")
    assert family in list_families(trainable=True)
    assert family.input_kind == "slide" and family.data_sources == ("slide_table",)
    assert (family.best_metric, family.best_mode) == ("val_loss", "min")
    flags = [f.flag for f in family.setting_fields()]
    assert {"--input-mpp", "--tile", "--memory-gb", "--arch", "--width"} <= set(flags)
    assert family.defaults()["input_mpp"] == 2.5
    with pytest.raises(Exception, match="one class"):
        from napari_pathology.cohort import SlideEntry

        family.check_table([SlideEntry(Path("a.tif"), "normal"), SlideEntry(Path("b.tif"), "normal")])


def test_train_help_lists_its_settings(capsys) -> None:
    assert _main(["train", "wholeslide", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--input-mpp", "--tile", "--memory-gb"):
        assert flag in text
    assert "Memory budget of one training step" in text


@pytest.mark.slow
def test_train_then_run_from_the_command_line(tiny_cohort: Path, tmp_path: Path, capsys) -> None:
    from napari_pathology.analysis import load_result
    from napari_pathology.cohort import read_slide_table

    model = tmp_path / "ws.pt"
    args = [
        "train", "wholeslide", "--data", str(tiny_cohort), "--out", str(model), "--arch", "resnet18",
        "--width", "2", "--no-imagenet", "--input-mpp", "8", "--tile", "128", "--accumulation", "1",
        "--epochs", "1", "--val-fraction", "0.5", "--quiet",
    ]  # fmt: skip
    assert _main(args) == 0, capsys.readouterr().err
    assert model.exists()
    slide = read_slide_table(tiny_cohort)[0].path
    out = tmp_path / "results"
    assert _main(["run", str(slide), "--model", str(model), "--out", str(out), "--quiet"]) == 0
    (folder,) = [p.parent for p in out.rglob("result.json")]
    meta = json.loads((folder / "result.json").read_text())
    assert meta["heatmap_kind"] == "activation" and not meta["partial"]
    assert set(meta["scores"]) == {"normal", "tumour"} and meta["score_name"] == "P(tumour)"
    result = load_result(folder)
    assert result.cell_um == pytest.approx(32 * 8.0) and result.class_heatmaps.shape[0] == 2
    assert result.slide_score == pytest.approx(result.scores["tumour"])


def test_the_train_and_analyze_panels_offer_it(make_napari_viewer) -> None:
    from napari_pathology._widgets.analyze_panel import AnalyzePanel
    from napari_pathology._widgets.train_panel import TrainPanel

    viewer = make_napari_viewer()
    analyze = AnalyzePanel(viewer)
    assert "wholeslide-resnet50" in [
        analyze.model_combo.itemData(i) for i in range(analyze.model_combo.count())
    ]
    train = TrainPanel(viewer)
    families = [train.family_combo.itemData(i) for i in range(train.family_combo.count())]
    assert "wholeslide" in families
    train.select_family("wholeslide")
    assert train.setting_widget("memory_gb").value == 6.0
    assert train.setting_widget("input_mpp").value == 2.5
