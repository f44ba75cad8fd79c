"""``napari-pathology features`` end to end on a tiny slide, and its refusals in one line."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from napari_pathology.cli import main


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch cache: the encoder is untrained and must say so."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def _slide(path: Path) -> Path:
    """512 x 512 px (used at 1 um/px): pink textured tissue on the left half, glass on the right."""
    rng = np.random.default_rng(5)
    image = np.full((512, 512, 3), 242, np.uint8)
    image[:, :256] = (rng.normal(0, 20, (512, 256, 3)) + np.array([190, 110, 170])).clip(0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


ARGS = ["--encoder", "resnet50-trunc", "--patch-size", "64", "--mpp", "2", "--slide-mpp", "1",
        "--device", "cpu", "--batch-size", "4", "--quiet"]  # fmt: skip


@pytest.mark.slow  # builds ResNet-50 twice
def test_features_writes_a_clam_h5_per_slide(tmp_path, torch_home, capsys) -> None:
    slide = _slide(tmp_path / "in" / "node.png")
    out = tmp_path / "out"
    assert main(["features", str(slide), "--out", str(out), *ARGS]) == 0
    captured = capsys.readouterr()
    assert "UNTRAINED" in captured.err and f"{out / 'node.h5'}: " in captured.out
    with h5py.File(out / "node.h5", "r") as h5:
        features, coords = h5["features"][:], h5["coords"][:]
        assert features.dtype == np.float32 and features.shape[1] == 1024
        assert coords.shape == (len(features), 2) and coords.dtype.kind == "i"
        # 64 px at 2 um/px = 128 level-0 px per patch: top-left corners on that grid, in the tissue half
        assert h5["coords"].attrs["patch_size"] == 128 and h5["coords"].attrs["patch_level"] == 0
        assert 4 <= len(coords) <= 8 and not (coords % 128).any() and coords[:, 0].max() < 256
        assert not h5.attrs["trained"] and h5.attrs["encoder"] == "resnet50-trunc"
    assert (out / "cache").is_dir()

    assert main(["features", str(slide), "--out", str(out), *ARGS]) == 2  # never replaced silently
    assert "already exists" in capsys.readouterr().err
    assert main(["features", str(slide), "--out", str(out), "--overwrite", *ARGS]) == 0
    with h5py.File(out / "node.h5", "r") as h5:  # an untrained encoder is seeded: the same, from the cache
        np.testing.assert_array_equal(h5["features"][:], features)
    assert len(list((out / "cache").iterdir())) == 1


def test_features_refusals_are_one_line(tmp_path, torch_home, capsys) -> None:
    a, b = _slide(tmp_path / "a" / "s.png"), _slide(tmp_path / "b" / "s.png")
    assert main(["features", str(a), str(b), "--out", str(tmp_path / "out"), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "would both be written to" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert main(["features", str(a), "--out", str(tmp_path / "out")]) == 2
    assert "features needs --encoder" in capsys.readouterr().err
    assert main(["features", str(a), str(tmp_path / "gone.png"), "--out", str(tmp_path / "out"), *ARGS]) == 2
    err = capsys.readouterr().err  # said before any encoder is built or any slide extracted
    assert "gone.png" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "s.h5").exists()
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    args = ["features", str(a), "--out", str(tmp_path / "out"), *ARGS, "--weights", str(tmp_path / "bad.pth")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bad.pth is not a PyTorch weights file" in err and len(err.strip().splitlines()) == 1


def test_features_list_shows_encoders_and_their_weights(torch_home, capsys) -> None:
    assert main(["features", "--list"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("resnet50-trunc\t"))
    assert "1024-d" in line and "256px @ 0.5 um/px" in line and "untrained" in line
    assert "tumor-normal-trunk" in out and "torchvision:<model>" in out


@pytest.mark.parametrize(
    "option", [["--batch-size", "0"], ["--patch-size", "8"], ["--mpp", "nan"], ["--min-tissue", "2"]]
)
def test_bad_options_are_refused_before_any_work(tmp_path, capsys, option) -> None:
    args = ["features", "s.png", "--encoder", "resnet50-trunc", "--out", str(tmp_path / "o"), *option]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"argument {option[0]}" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # builds ResNet-50 twice
def test_an_interrupted_command_resumes(tmp_path, torch_home, capsys, monkeypatch) -> None:
    import zarr

    from napari_pathology.cli import features as command

    slide, out = _slide(tmp_path / "node.png"), tmp_path / "out"
    original = command.run_with_progress

    def one_batch_then_ctrl_c(job, description, quiet):
        next(job)
        job.close()  # what run_with_progress does when Ctrl-C lands in it
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "run_with_progress", one_batch_then_ctrl_c)
    assert main(["features", str(slide), "--out", str(out), *ARGS]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert not (out / "node.h5").exists()
    (entry,) = (out / "cache").iterdir()
    assert zarr.open_group(str(entry), mode="r")["done"][:].tolist()[:1] == [True]
    monkeypatch.setattr(command, "run_with_progress", original)
    assert main(["features", str(slide), "--out", str(out), *ARGS]) == 0
    assert (out / "node.h5").exists() and [p.name for p in (out / "cache").iterdir()] == [entry.name]
