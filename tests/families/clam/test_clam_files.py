"""CLAM's own checkpoints through the program's front doors: resolve_model, run, export (CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_pathology.families.clam.interop import clam_state_dict
from napari_pathology.families.clam.model import ClamNet
from napari_pathology.models import ModelError, resolve_model


def _clam_file(
    tmp_path: Path, prefix: str = "", classes: int = 2, embed_dim: int = 1024
) -> tuple[Path, ClamNet]:
    torch.manual_seed(3)
    net = ClamNet(classes, "sb" if classes == 2 else "mb", embed_dim=embed_dim).eval()
    state = {f"{prefix}{k}": v for k, v in clam_state_dict(net).items()}
    path = tmp_path / "s_0_checkpoint.pt"
    torch.save(state, path)
    return path, net


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "napari_pathology.cli", *map(str, args)], capture_output=True, text=True
    )


@pytest.mark.parametrize("prefix", ["", "module."])
def test_a_clam_checkpoint_opens_as_a_model_with_the_classes_given(tmp_path, prefix) -> None:
    path, net = _clam_file(tmp_path, prefix)
    model = resolve_model(str(path), classes="normal,tumour")
    assert model.spec.family == "clam" and model.spec.classes == ("normal", "tumour")
    assert model.spec.config["encoder"] == "resnet50-trunc"
    bag = torch.randn(20, 1024)
    with torch.inference_mode():
        torch.testing.assert_close(model.net.run(bag).probabilities, net.run(bag).probabilities)
        torch.testing.assert_close(model.net.attention_scores(bag), net.run(bag).attention)
    assert resolve_model(str(path)).spec.classes == ("class 0", "class 1")


def test_a_bare_state_dict_no_family_knows_is_refused_in_one_line(tmp_path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(2, 3, 3, 3)}, path)
    with pytest.raises(ModelError, match=r"bare state_dict .* no model family recognises its weights"):
        resolve_model(str(path))


def test_export_writes_clams_layout_and_refuses_other_formats_and_overwrites(tmp_path) -> None:
    path, net = _clam_file(tmp_path, classes=3)
    out = tmp_path / "back.pt"
    done = _cli("export", path, "--classes", "normal,a,b", "--format", "clam", "--out", out)
    assert done.returncode == 0, done.stderr
    state = torch.load(out, weights_only=True)
    reference = clam_state_dict(net)
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value)
    again = _cli("export", path, "--format", "clam", "--out", out)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    other = _cli("export", "tumor-normal", "--format", "clam", "--out", tmp_path / "x.pt")
    assert other.returncode != 0 and "cannot be written as 'clam'" in other.stderr


@pytest.mark.slow
def test_run_a_clam_checkpoint_on_a_slide_from_the_command_line(tmp_path) -> None:
    from napari_pathology.slide.synthetic import write_synthetic_slide

    truth = write_synthetic_slide(tmp_path / "tiny.tif", 1024, 4)
    path, _net = _clam_file(tmp_path)
    done = _cli("run", truth.slide_path, "--model", path, "--classes", "normal,tumour", "--out",
                tmp_path / "results", "--quiet", "--tissue", "none")  # fmt: skip
    assert done.returncode == 0, done.stderr
    [meta] = list((tmp_path / "results").rglob("result.json"))
    result = json.loads(meta.read_text())
    assert result["heatmap_kind"] == "attention" and not result["partial"]
    assert set(result["scores"]) == {"normal", "tumour"}
    assert any("UNTRAINED" in note for note in result["provenance"]["notes"])


def test_run_on_clams_own_feature_file_gives_clams_numbers_and_attention_csv(tmp_path) -> None:
    """A CLAM checkpoint on a CLAM feature file: the probabilities and raw attention of CLAM's forward."""
    import csv

    from napari_pathology.features import write_clam_h5
    from napari_pathology.slide.synthetic import write_synthetic_slide

    truth = write_synthetic_slide(tmp_path / "tiny.tif", 1024, 4)
    path, net = _clam_file(tmp_path)
    xs, ys = np.meshgrid(np.arange(0, 1024, 256), np.arange(0, 768, 256))
    coords = np.column_stack([xs.ravel(), ys.ravel()]).astype(np.int64)
    torch.manual_seed(5)
    features = torch.randn(len(coords), 1024)
    h5 = write_clam_h5(tmp_path / "tiny.h5", features.numpy(), coords, 256, 0)
    done = _cli("run", truth.slide_path, "--model", path, "--classes", "normal,tumour", "--features", h5,
                "--out", tmp_path / "results", "--quiet")  # fmt: skip
    assert done.returncode == 0, done.stderr
    [folder] = [p.parent for p in (tmp_path / "results").rglob("result.json")]
    result = json.loads((folder / "result.json").read_text())
    with torch.inference_mode():
        reference = net.run(features)
    assert result["scores"]["tumour"] == pytest.approx(float(reference.probabilities[0, 1]), abs=1e-5)
    with open(folder / "attention.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(coords)
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [tuple(c) for c in coords.tolist()]
    np.testing.assert_allclose(
        [float(r["attention"]) for r in rows], reference.attention[0].numpy(), atol=1e-5
    )
    ranks = np.argsort(np.argsort(reference.attention[0].numpy()))
    np.testing.assert_allclose([float(r["percentile"]) for r in rows], (ranks + 1) / len(coords), atol=1e-6)
    tile_model = _cli("run", truth.slide_path, "--model", "metastasis", "--features", h5, "--out",
                      tmp_path / "x", "--quiet")  # fmt: skip
    assert tile_model.returncode == 2 and "bag" in tile_model.stderr


def test_a_feature_file_of_another_slide_is_refused(tmp_path) -> None:
    from napari_pathology.features import write_clam_h5
    from napari_pathology.slide.synthetic import write_synthetic_slide

    truth = write_synthetic_slide(tmp_path / "tiny.tif", 1024, 4)
    path, _net = _clam_file(tmp_path)
    h5 = write_clam_h5(
        tmp_path / "other.h5", np.zeros((2, 1024), np.float32), np.array([[0, 0], [4096, 0]]), 256, 0
    )
    done = _cli(
        "run", truth.slide_path, "--model", path, "--features", h5, "--out", tmp_path / "r", "--quiet"
    )
    assert done.returncode == 2 and "outside the slide" in done.stderr
