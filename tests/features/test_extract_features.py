"""Cached, resumable feature extraction and the CLAM-layout h5 file it exports."""

from __future__ import annotations

import shutil
import threading
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from napari_pathology.features import (
    Encoder,
    extract_features,
    level0_coords,
    read_clam_h5,
    write_clam_h5,
)
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import InMemoryBackend, Slide


class MeanStd(nn.Module):
    """A tiny deterministic encoder (channel means and spreads) that counts the tiles it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.tiles = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tiles += len(x)
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1) * self.scale


def _encoder() -> Encoder:
    return Encoder("test-mean-std", MeanStd(), 6, 32, 2.0, "unit", trained=True)


@pytest.fixture(scope="module")
def slide() -> Slide:
    """512 x 384 px at 1 um/px: textured pink tissue on the left half, glass on the right."""
    rng = np.random.default_rng(3)
    image = np.full((384, 512, 3), 240, np.uint8)
    pink = np.array([200, 120, 170])
    image[:, :256] = (rng.normal(0, 25, (384, 256, 3)) + pink).clip(0, 255).astype(np.uint8)
    return Slide(InMemoryBackend([image], mpp=1.0))


@pytest.fixture(scope="module")
def tissue() -> SimpleNamespace:
    mask = np.zeros((48, 64), bool)  # 8 um/px
    mask[:, :32] = True
    return SimpleNamespace(mask=mask, mpp=8.0)


def test_features_of_the_tissue_tiles_with_their_level0_corners(slide, tissue) -> None:
    feats = run_to_completion(extract_features(slide, _encoder(), tissue=tissue, workers=0))
    # 32 px tiles at 2 um/px = 64 um: a 8 x 6 grid, tissue in the 4 left columns
    assert feats.grid.shape == (6, 8) and len(feats) == 24 and feats.features.shape == (24, 6)
    assert feats.coords.dtype == np.int64
    np.testing.assert_array_equal(feats.coords, feats.cells[:, ::-1] * 64)
    assert feats.coords[:, 0].max() == 192 and feats.coords[:, 1].max() == 320
    assert feats.clam_patch() == (64, 0)  # 64 level-0 px read from level 0, as CLAM records it
    region = slide.read_region(0, 64, 128, 64, 64).astype(np.float32)  # the tile at cell (2, 1), by hand:
    tile = region.reshape(32, 2, 32, 2, 3).mean((1, 3))  # 2 x 2 px averaged to 2 um/px
    row = int(np.flatnonzero((feats.cells == (2, 1)).all(1))[0])
    x = torch.from_numpy(tile[None] / 255).permute(0, 3, 1, 2)
    expected = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1).numpy()[0]
    np.testing.assert_allclose(feats.features[row], expected, atol=0.01)


def test_an_interrupted_extraction_resumes_without_recomputing(slide, tissue, tmp_path) -> None:
    encoder = _encoder()
    job = extract_features(slide, encoder, tissue=tissue, cache_dir=tmp_path, batch_size=4)
    next(job), next(job)  # two batches of 4 done ...
    job.close()  # ... then interrupted
    assert encoder.net.tiles == 8
    encoder.net.tiles = 0
    resumed = run_to_completion(
        extract_features(slide, encoder, tissue=tissue, cache_dir=tmp_path, batch_size=5)
    )
    assert encoder.net.tiles == 24 - 8  # only what was missing, whatever the new batch size
    fresh = run_to_completion(extract_features(slide, _encoder(), tissue=tissue, batch_size=24))
    np.testing.assert_array_equal(resumed.features, fresh.features)
    encoder.net.tiles = 0
    again = run_to_completion(extract_features(slide, encoder, tissue=tissue, cache_dir=tmp_path))
    assert encoder.net.tiles == 0 and again.path == resumed.path
    np.testing.assert_array_equal(again.features, fresh.features)


def test_a_stop_keeps_the_done_batches(slide, tissue, tmp_path) -> None:
    encoder, stop = _encoder(), threading.Event()
    job = extract_features(slide, encoder, tissue=tissue, cache_dir=tmp_path, batch_size=6, stop=stop)
    next(job)  # the first batch is done
    stop.set()  # the job stops before the next one
    with pytest.raises(InterruptedError, match=r"stopped after 6/24 tiles; the cache .*\.zarr keeps them"):
        run_to_completion(job)
    encoder.net.tiles = 0
    run_to_completion(extract_features(slide, encoder, tissue=tissue, cache_dir=tmp_path, batch_size=6))
    assert encoder.net.tiles == 18


def test_the_cache_is_keyed_by_the_weights_and_a_torn_entry_is_recomputed(slide, tissue, tmp_path) -> None:
    encoder = _encoder()
    first = run_to_completion(extract_features(slide, encoder, tissue=tissue, cache_dir=tmp_path))
    with torch.no_grad():
        encoder.net.scale.mul_(2)
    changed = run_to_completion(extract_features(slide, encoder, tissue=tissue, cache_dir=tmp_path))
    assert changed.path != first.path
    np.testing.assert_allclose(changed.features, 2 * first.features, rtol=1e-6)
    shutil.rmtree(changed.path / "done")  # torn: the done flags are gone
    encoder.net.tiles = 0
    again = run_to_completion(extract_features(slide, encoder, tissue=tissue, cache_dir=tmp_path))
    assert encoder.net.tiles == 24 and np.array_equal(again.features, changed.features)


def test_no_tissue_gives_an_empty_result(slide) -> None:
    empty = SimpleNamespace(mask=np.zeros((48, 64), bool), mpp=8.0)
    feats = run_to_completion(extract_features(slide, _encoder(), tissue=empty))
    assert len(feats) == 0 and feats.features.shape == (0, 6) and feats.coords.shape == (0, 2)


def test_the_h5_file_has_clam_layout(slide, tissue, tmp_path) -> None:
    feats = run_to_completion(extract_features(slide, _encoder(), tissue=tissue))
    attrs = {"encoder": "test-mean-std", "trained": False, "provenance": {"a": 1}}
    path = write_clam_h5(tmp_path / "s.h5", feats.features, feats.coords, *feats.clam_patch(), attrs=attrs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # no temporary left
    with h5py.File(path, "r") as h5:
        assert sorted(h5.keys()) == ["coords", "features"]
        assert h5["features"].dtype == np.float32 and h5["features"].shape == (24, 6)
        assert h5["coords"].dtype.kind == "i" and h5["coords"].shape == (24, 2)
        assert h5["coords"].attrs["patch_size"] == 64 and h5["coords"].attrs["patch_level"] == 0
        np.testing.assert_array_equal(h5["coords"][:], level0_coords(feats.grid))
        assert not h5.attrs["trained"]
    back = read_clam_h5(path)
    np.testing.assert_array_equal(back.features, feats.features)
    assert (back.patch_size, back.patch_level) == (64, 0) and back.attrs["provenance"] == {"a": 1}


def test_bad_feature_files_are_refused_in_one_line(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"coords must be \(3, 2\)"):
        write_clam_h5(tmp_path / "a.h5", np.zeros((3, 4)), np.zeros((2, 2), int), 256, 0)
    with pytest.raises(ValueError, match="whole level-0 pixel"):
        write_clam_h5(tmp_path / "a.h5", np.zeros((1, 4)), np.array([[0.5, 1.0]]), 256, 0)
    assert not (tmp_path / "a.h5").exists()
    with h5py.File(tmp_path / "nofeat.h5", "w") as h5:
        h5["coords"] = np.zeros((2, 2), int)
    with pytest.raises(ValueError, match="has no 'features' dataset"):
        read_clam_h5(tmp_path / "nofeat.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(ValueError, match="is not an HDF5 feature file"):
        read_clam_h5(tmp_path / "text.h5")
    with h5py.File(tmp_path / "short.h5", "w") as h5:
        h5["features"] = np.zeros((3, 4), np.float32)
        h5["coords"] = np.zeros((2, 2), int)
    with pytest.raises(ValueError, match=r"short\.h5: 2 coords for 3 feature rows"):
        read_clam_h5(tmp_path / "short.h5")
