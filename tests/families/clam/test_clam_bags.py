"""CLAM bags: a feature file whose coords do not belong to its slide is refused before training."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from napari_pathology.families.clam.bags import bag_path, read_bag, slide_dimensions
from napari_pathology.families.clam.train import ClamTraining, train_clam
from napari_pathology.training.events import TrainingError


def _bag(path, coords, dim=8):
    with h5py.File(path, "w") as h5:
        h5["features"] = np.random.default_rng(0).normal(size=(len(coords), dim)).astype(np.float32)
        h5["coords"] = np.asarray(coords, np.int64)


def test_slide_dimensions_from_the_header(synthetic_slide, tmp_path):
    assert slide_dimensions(synthetic_slide.slide_path) == (3072, 3072)
    (tmp_path / "p.svs").write_bytes(b"placeholder")
    assert slide_dimensions(tmp_path / "p.svs") is None and slide_dimensions(tmp_path / "none.svs") is None


def test_read_bag_refuses_coords_outside_the_slide_in_one_line(tmp_path):
    path = tmp_path / "s.h5"
    _bag(path, [[0, 0], [256, 256], [4096, 0]])
    assert read_bag(path, 8).shape == (3, 8)  # size unknown: read
    assert read_bag(path, 8, slide_size=(8192, 8192)).shape == (3, 8)
    with pytest.raises(TrainingError) as info:
        read_bag(path, 8, slide_size=(3072, 3072))
    assert "\n" not in str(info.value)
    expected = f"{path}: patch 2 at (4096, 0) lies outside the slide of 3072 x 3072 px"
    assert str(info.value).startswith(expected)
    _bag(path, [[0, 0], [256, 256]])
    with h5py.File(path, "a") as h5:
        del h5["coords"]
        h5["coords"] = np.zeros((1, 2), np.int64)
    with pytest.raises(TrainingError, match=r"s\.h5: 1 coords for 2 feature rows"):
        read_bag(path)


def test_training_refuses_a_bag_of_another_slide(synthetic_slide, tmp_path):
    """The trainer knows each slide's size: a file of a bigger slide (or level) is named before training."""
    rows = ["slide,label"]
    (tmp_path / "features").mkdir()
    for k in range(4):
        slide = tmp_path / f"s{k}.tif"
        shutil.copy(synthetic_slide.slide_path, slide)
        rows.append(f"{slide.name},{'tumour' if k % 2 else 'normal'}")
        _bag(bag_path(tmp_path / "features", slide), [[0, 0], [256, 0], [512, 512]])
    _bag(bag_path(tmp_path / "features", "s3.tif"), [[0, 0], [2816, 2816], [6144, 256]])  # a 8192 px slide's
    (tmp_path / "table.csv").write_text("\n".join(rows) + "\n")
    job = ClamTraining(tmp_path / "table.csv", tmp_path / "m.pt", epochs=1, val_fraction=0.0, threads=1)
    generator = train_clam(job)
    with pytest.raises(TrainingError) as info:
        while True:
            next(generator)
    assert "\n" not in str(info.value)
    assert "s3.h5: patch 2 at (6144, 256) lies outside the slide of 3072 x 3072 px" in str(info.value)
