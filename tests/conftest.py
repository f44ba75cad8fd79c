"""Shared fixtures: real data from ../shared/data (skipped when absent), synthetic slides."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NAPARI_PATHOLOGY_SHARED_DATA", REPO.parent / "shared" / "data"))
SLIDES = SHARED_DATA / "slides"


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never write demo slides, settings or autosaves into the user's own folders during tests."""
    os.environ["NAPARI_PATHOLOGY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["NAPARI_PATHOLOGY_DATA"] = str(tmp_path_factory.mktemp("user-data"))  # settings, autosaves


def real_file(relative: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real test data not available: {path} (needs ../shared/data beside the repo)")
    return path


class ProceduralLevel:
    """A huge array-like whose pixels are computed on demand (nothing stored)."""

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, height: int, width: int, downsample: float) -> None:
        self.shape = (height, width, 3)
        self.downsample = downsample

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        ys, xs = key[0], key[1]
        y = (np.arange(*ys.indices(self.shape[0])) * self.downsample)[:, None]
        x = (np.arange(*xs.indices(self.shape[1])) * self.downsample)[None, :]
        stripes = (((x // 4000) + (y // 4000)) % 2).astype(np.uint8)
        r = np.broadcast_to(230 - 90 * stripes, (y.size, x.size))
        g = np.broadcast_to(((x / self.shape[1] / self.downsample) * 200).astype(np.uint8), r.shape)
        b = np.broadcast_to(((y / self.shape[0] / self.downsample) * 200).astype(np.uint8), r.shape)
        return np.stack([r, g, b], axis=-1).astype(np.uint8)


def procedural_levels(size: int = 100_000, smallest: int = 1024) -> list[ProceduralLevel]:
    """Levels of a ``size`` x ``size`` procedural slide, halving down to ``smallest``."""
    levels, side, ds = [], size, 1.0
    while True:
        levels.append(ProceduralLevel(side, side, ds))
        if side <= smallest:
            return levels
        side, ds = -(-side // 2), ds * 2


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory):
    """A small synthetic tumour slide (3072 px at 0.5 um/px) with ground truth."""
    from napari_pathology.slide.synthetic import write_synthetic_slide

    out = tmp_path_factory.mktemp("synthetic") / "slide.tif"
    return write_synthetic_slide(out, size=3072, seed=11)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Slide table of 4 small synthetic slides (4096 px at 0.5 um/px): 2 negative, 2 macro-metastasis."""
    from napari_pathology.cohort import write_synthetic_cohort
    from napari_pathology.progress import run_to_completion

    folder = tmp_path_factory.mktemp("cohort")
    return run_to_completion(
        write_synthetic_cohort(folder, 4, 5, size=4096, negative_fraction=0.5, micro_fraction=0)
    )


@pytest.fixture(scope="session")
def unseen_slides(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Slides no shipped model saw (new seeds): a 6144 px macro-metastasis slide and a 4096 px negative."""
    from napari_pathology.slide.synthetic import write_synthetic_slide

    folder = tmp_path_factory.mktemp("unseen")
    return {
        "tumour": write_synthetic_slide(folder / "tumour.tif", size=6144, seed=424242),
        "negative": write_synthetic_slide(folder / "negative.tif", size=4096, seed=515151, negative=True),
    }
