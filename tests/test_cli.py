"""The napari-pathology command: info, synth, demo --headless, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import real_file
from napari_pathology.cli import main


def test_info_json_has_the_documented_keys(capsys) -> None:
    assert main(["info", str(real_file("slides/cmu_small_region.svs")), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"vendor", "width", "height", "levels", "mpp_x", "mpp_y", "objective_power"} <= set(info)
    assert (info["vendor"], info["width"], info["height"], info["levels"]) == ("aperio", 2220, 2967, 1)
    assert info["mpp_x"] == pytest.approx(0.499) and info["objective_power"] == 20


def test_info_text_and_mpp_override(capsys) -> None:
    assert main(["info", str(real_file("slides/boxes.tiff"))]) == 0
    out = capsys.readouterr().out
    assert "unknown" in out and "generic-tiff" in out
    assert main(["info", str(real_file("slides/boxes.tiff")), "--mpp", "0.5"]) == 0
    assert "0.5 x 0.5 um/px (user)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["unopenable.tiff", "broken.svs", "unreadable.svs"])
def test_info_on_broken_file_exits_nonzero_with_one_line(capsys, name) -> None:
    assert main(["info", str(real_file(f"slides/{name}"))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and err.startswith("napari-pathology: error:")


def test_info_on_missing_and_unsupported_files(tmp_path, capsys) -> None:
    assert main(["info", str(tmp_path / "nope.svs")]) == 2
    assert "no such file" in capsys.readouterr().err
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    assert main(["info", str(other)]) == 2
    assert "unsupported file type" in capsys.readouterr().err


def test_synth_writes_slide_and_ground_truth(tmp_path, capsys) -> None:
    out = tmp_path / "neg.tif"
    assert main(["synth", str(out), "--size", "2048", "--seed", "5", "--negative", "--quiet"]) == 0
    assert "label normal" in capsys.readouterr().out
    for suffix in (".truth.json", ".tumour.geojson", ".tissue.png", ".tumour.png", ".nuclei.csv"):
        assert (tmp_path / f"neg{suffix}").exists(), suffix
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["width"], info["mpp_x"]) == (2048, pytest.approx(0.5, abs=1e-3))
    assert main(["synth", str(tmp_path / "x.png"), "--size", "512"]) == 2


def test_demo_headless_makes_the_slide_once_and_prints_a_summary(tmp_path, capsys) -> None:
    args = ["demo", "--headless", "--size", "2048", "--cache-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "truth:" in out and "label tumour" in out and "0.5 x 0.5 um/px" in out
    assert "metastasis:" in out and "tumor-normal:" in out and "slide score" in out
    made = sorted(p.name for p in tmp_path.iterdir())
    assert any(name.endswith(".tif") for name in made) and not any(n.startswith(".") for n in made)
    stamp = next(tmp_path.glob("*.tif")).stat().st_mtime_ns
    assert main(args) == 0  # cached: not regenerated
    assert next(tmp_path.glob("*.tif")).stat().st_mtime_ns == stamp


def test_console_script_is_installed() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "napari_pathology.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "demo" in result.stdout and "synth" in result.stdout


def test_models_lists_one_per_line_name_first(capsys) -> None:
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "nuclear-density" in [line.split()[0] for line in lines]


def test_tissue_writes_mask_json_and_geojson(tmp_path, capsys, synthetic_slide) -> None:
    assert main(["tissue", str(synthetic_slide.slide_path), "--out", str(tmp_path), "--quiet"]) == 0
    for name in ("tissue.png", "tissue.json", "tissue.geojson"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "tissue.json").read_text())["mpp"] == 8.0


def test_run_writes_results_and_reloads_them(tmp_path, capsys, synthetic_slide) -> None:
    args = ["run", str(synthetic_slide.slide_path), "--model", "nuclear-density", "--out", str(tmp_path),
            "--quiet"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "slide" / "nuclear-density"
    assert f"results: {folder}" in out
    result = json.loads((folder / "result.json").read_text())
    assert result["partial"] is False and result["slide_score"] > 0.5
    assert result["spec"]["name"] == "nuclear-density" and result["key"]
    assert (folder / "detections.csv").read_text().startswith("x_um,y_um,score")
    assert (folder / "heatmap.zarr").exists()
    stamp = (folder / "result.json").stat().st_mtime_ns
    assert main(args) == 0  # unchanged inputs: reloaded, not recomputed
    assert (folder / "result.json").stat().st_mtime_ns == stamp


def test_run_with_a_file_that_is_not_a_checkpoint(tmp_path, capsys, synthetic_slide) -> None:
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a checkpoint")
    args = ["run", str(synthetic_slide.slide_path), "--model", str(bogus), "--out", str(tmp_path), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.pt" in err


def test_models_lists_the_shipped_demo_models_first_class(capsys) -> None:
    assert main(["models"]) == 0
    rows = {line.split("\t")[0]: line for line in capsys.readouterr().out.strip().splitlines()}
    assert "not for diagnostic use" in rows["metastasis"] and "not for diagnostic use" in rows["tumor-normal"]
    assert {"metastasis-small-10x", "metastasis-inception-v3", "tumor-normal-inception-v3"} <= set(rows)


def test_train_then_evaluate_from_the_command_line(tmp_path, capsys, tiny_cohort) -> None:
    from napari_pathology.models import load_checkpoint

    out = tmp_path / "met.pt"
    args = ["train", "metastasis", "--data", str(tiny_cohort), "--out", str(out), "--steps", "3",
            "--batch-size", "4", "--val-fraction", "0", "--quiet"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"best checkpoint: {out}" in printed and "(step 3)" in printed
    assert load_checkpoint(out).spec.family == "metastasis"

    report = tmp_path / "eval"
    assert main(["evaluate", "--model", "nuclear-density", "--data", str(tiny_cohort), "--out", str(report),
                 "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "slide AUC" in printed and "FROC" in printed
    summary = json.loads((report / "evaluation-nuclear-density.json").read_text())
    assert summary["n_slides"] == 4 and summary["slide_auc"]["n_positive"] == 2
    assert len(summary["slides"]) == 4


def test_train_with_a_bad_table_is_one_line(tmp_path, capsys) -> None:
    table = tmp_path / "slides.csv"
    table.write_text("slide,label\nmissing.tif,tumour\n")
    assert (
        main(["train", "tumor-normal", "--data", str(table), "--out", str(tmp_path / "x.pt"), "--quiet"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_nuclei_writes_csv_and_geojson_for_a_roi(tmp_path, capsys, synthetic_slide) -> None:
    import numpy as np
    from skimage.io import imsave

    out, geojson = tmp_path / "out" / "points.csv", tmp_path / "points.geojson"
    args = ["nuclei", str(synthetic_slide.slide_path), "--out", str(out), "--roi", "600,600,200,150"]
    assert main([*args, "--geojson", str(geojson), "--chunk-px", "256", "--quiet"]) == 0
    printed = capsys.readouterr().out
    rows = out.read_text().splitlines()
    assert rows[0] == "x_um,y_um,area_um2,hematoxylin,eccentricity" and len(rows) > 50
    xy = [tuple(map(float, r.split(",")[:2])) for r in rows[1:]]
    assert all(600 <= x < 800 and 600 <= y < 750 for x, y in xy)
    assert f"{len(rows) - 1} nuclei in x=600 y=600 w=200 h=150 um" in printed and str(out) in printed
    features = json.loads(geojson.read_text())["features"]
    assert len(features) == len(rows) - 1  # level-0 px at 0.5 um/px
    assert features[0]["geometry"]["coordinates"] == pytest.approx([xy[0][0] / 0.5, xy[0][1] / 0.5])
    # the same region in level-0 pixels
    assert main(["nuclei", str(synthetic_slide.slide_path), "--out", str(tmp_path / "px.csv"),
                 "--roi", "1200,1200,400,300px", "--chunk-px", "256", "--quiet"]) == 0  # fmt: skip
    assert (tmp_path / "px.csv").read_text().count("\n") == len(rows)
    assert main([*args[:4], "--roi", "1,2,3", "--overwrite", "--quiet"]) == 2
    assert "--roi must be x,y,w,h" in capsys.readouterr().err
    png = tmp_path / "tile.png"
    imsave(png, np.full((64, 64, 3), 230, np.uint8), check_contrast=False)
    assert main(["nuclei", str(png), "--out", str(tmp_path / "tile.csv"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--mpp" in err and len(err.strip().splitlines()) == 1
    assert main(["nuclei", str(png), "--out", str(tmp_path / "tile.csv"), "--mpp", "0.5", "--quiet"]) == 0
    assert "0 nuclei in the whole slide of tile.png" in capsys.readouterr().out


def test_train_nucleus_purity_from_a_slide_table_then_run_it(tmp_path, capsys, synthetic_slide) -> None:
    import csv as csv_module
    import shutil

    from napari_pathology.models import load_checkpoint

    slide = tmp_path / "slide.tif"
    shutil.copy(synthetic_slide.slide_path, slide)
    table = tmp_path / "slides.csv"
    with open(table, "w", newline="") as fh:
        writer = csv_module.writer(fh)
        writer.writerow(["slide", "nuclei"])
        writer.writerow(["slide.tif", str(synthetic_slide.nuclei_csv)])  # labelled nuclei (truth)
    out = tmp_path / "purity.pt"
    assert main(["train", "nucleus-purity", "--data", str(table), "--out", str(out), "--epochs", "1",
                 "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "best checkpoint" in printed and "auc" in printed
    assert load_checkpoint(out).spec.family == "nucleus-purity"

    assert main(["run", str(slide), "--model", str(out), "--out", str(tmp_path / "res"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "predicted purity" in printed
    [summary] = (tmp_path / "res").rglob("result.json")
    assert 0.0 < json.loads(summary.read_text())["slide_score"] < 1.0  # the predicted purity


def test_train_nucleus_purity_without_labels_is_a_clear_error(tmp_path, capsys, synthetic_slide) -> None:
    import shutil

    slide = tmp_path / "slide.tif"
    shutil.copy(synthetic_slide.slide_path, slide)
    assert main(["train", "nucleus-purity", "--data", str(slide), "--out", str(tmp_path / "x.pt")]) == 2
    assert "no nucleus labels" in capsys.readouterr().err
