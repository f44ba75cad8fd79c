"""Tile grids, tile reading, batch loading and tensor helpers (no Qt, small in-memory slides)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from napari_pathology.slide import InMemoryBackend, Slide, SlideReadError
from napari_pathology.tiles import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATIONS,
    MaskLike,
    TileLoader,
    dihedral,
    make_tile_grid,
    read_tile,
    tissue_fractions,
    to_tensor,
    tta_mean,
)


@dataclass
class Mask:
    mask: np.ndarray
    mpp: float


def smooth_image(height: int, width: int, seed: int = 0, sigma: float = 3.0) -> np.ndarray:
    """Smooth random RGB uint8 (resampling differences stay small on it)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((height, width, 3))
    smooth = ndimage.gaussian_filter(noise, (sigma, sigma, 0))
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (30 + 200 * smooth).astype(np.uint8)


def box_down2(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    blocks = image[:h, :w].astype(np.float64).reshape(h // 2, 2, w // 2, 2, 3)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


def pyramid_slide(image: np.ndarray, mpp: float, levels: int) -> Slide:
    stack = [image]
    for _ in range(levels - 1):
        stack.append(box_down2(stack[-1]))
    return Slide(InMemoryBackend(stack, mpp=mpp))


# --------------------------------------------------------------------------- geometry


def test_grid_geometry_matches_the_heatmap_convention() -> None:
    slide = Slide(InMemoryBackend([np.zeros((1000, 1510, 3), np.uint8)], mpp=0.5))  # 755 x 500 um
    grid = make_tile_grid(slide, target_mpp=1.0, tile_size=100, stride=50)
    assert grid.shape == (10, 16)  # ceil(500 / 50), ceil(755 / 50)
    assert len(grid) == 160 and grid.cells.dtype == np.int64
    assert grid.cell_um == 50.0 and grid.first_centre_um == (50.0, 50.0)
    assert grid.slide_mpp == (0.5, 0.5) and grid.slide_size == (1510, 1000)
    assert grid.tissue_fraction.dtype == np.float32 and np.all(grid.tissue_fraction == 1.0)
    assert grid.cells[:3].tolist() == [[0, 0], [0, 1], [0, 2]]  # row-major
    i = int(np.flatnonzero((grid.cells[:, 0] == 3) & (grid.cells[:, 1] == 7))[0])
    assert grid.origins_um[i].tolist() == [350.0, 150.0]  # (x, y)
    assert grid.centres_um[i].tolist() == [400.0, 200.0]
    y0, x0 = grid.first_centre_um
    r, c = grid.cells[:, 0], grid.cells[:, 1]
    np.testing.assert_allclose(grid.centres_um, np.stack([x0 + c * grid.cell_um, y0 + r * grid.cell_um], 1))
    # level 0 is 0.5 um/px: the 1 um/px tile is a 200 x 200 level box, resampled
    assert (grid.level, grid.level_mpp, grid.direct) == (0, 0.5, False)
    assert grid.level_box(i) == (700.0, 300.0, 200.0, 200.0)
    assert grid.to_dict()["shape"] == [10, 16]
    with pytest.raises(AttributeError):
        grid.stride = 3  # frozen
    with pytest.raises(ValueError):
        grid.cells[0, 0] = 5  # read-only arrays


def test_stride_defaults_to_tile_size_and_anisotropic_pixels() -> None:
    slide = Slide(InMemoryBackend([np.zeros((300, 400, 3), np.uint8)], mpp=(1.0, 2.0)))  # 400 x 600 um
    grid = make_tile_grid(slide, target_mpp=2.0, tile_size=100)
    assert grid.stride == 100 and grid.shape == (3, 2) and not grid.direct
    i = len(grid) - 1
    assert grid.level_box(i) == (200.0, 200.0, 200.0, 100.0)  # y in 2 um level px
    assert read_tile(slide, grid, i).shape == (100, 100, 3)
    with pytest.raises(ValueError, match="cannot reach"):  # y is only 2 um/px
        make_tile_grid(slide, target_mpp=1.0, tile_size=100)


def test_level_choice_is_the_coarsest_level_within_tolerance() -> None:
    slide = pyramid_slide(np.zeros((256, 256, 3), np.uint8), mpp=0.5, levels=3)  # 0.5, 1, 2 um/px
    cases = {
        0.5: (0, True),
        0.7: (0, False),
        1.0: (1, True),
        1.04: (1, True),
        1.9: (1, False),
        1.95: (2, True),
    }
    for target, (level, direct) in cases.items():
        grid = make_tile_grid(slide, target, 32)
        assert (grid.level, grid.direct) == (level, direct), target
    assert make_tile_grid(slide, 20.0, 8).level == 2
    assert make_tile_grid(slide, 0.49, 32).level == 0  # within 5% of level 0
    with pytest.raises(ValueError, match=r"\(0\.5 um/px at full resolution\) cannot reach the model's 0\.25"):
        make_tile_grid(slide, 0.25, 32)
    with pytest.raises(ValueError, match="tile_size"):
        make_tile_grid(slide, 1.0, 0)
    with pytest.raises(ValueError, match="positive"):
        make_tile_grid(slide, -1.0, 32)


def test_a_slide_without_mpp_gives_the_clear_error() -> None:
    from napari_pathology.slide import SlideOpenError

    slide = Slide(InMemoryBackend([np.zeros((64, 64, 3), np.uint8)]))
    with pytest.raises(SlideOpenError, match="no um/px"):
        make_tile_grid(slide, 1.0, 32)


# --------------------------------------------------------------------------- reading


def test_resampled_tiles_equal_a_direct_downscale() -> None:
    image = smooth_image(384, 456)
    fine = Slide(InMemoryBackend([image], mpp=0.25))  # only level 0: must resample
    coarse = Slide(InMemoryBackend([box_down2(image)], mpp=0.5))  # the 2x level itself
    g_fine = make_tile_grid(fine, 0.5, 64, 48)
    g_coarse = make_tile_grid(coarse, 0.5, 64, 48)
    assert not g_fine.direct and g_coarse.direct
    assert g_fine.shape == g_coarse.shape and np.array_equal(g_fine.cells, g_coarse.cells)
    for i in range(len(g_fine)):
        a = read_tile(fine, g_fine, i).astype(int)
        b = read_tile(coarse, g_coarse, i).astype(int)
        assert a.shape == (64, 64, 3)
        assert np.abs(a - b).max() <= 1, i

    # a non-integer factor (0.25 -> 0.6 um/px) matches resizing the whole image at once
    g = make_tile_grid(fine, 0.6, 40)
    whole = np.asarray(Image.fromarray(image).resize((190, 160), Image.Resampling.BOX))
    diffs = []
    for i, (r, c) in enumerate(g.cells):
        if (r + 1) * 40 <= whole.shape[0] and (c + 1) * 40 <= whole.shape[1]:
            expected = whole[r * 40 : (r + 1) * 40, c * 40 : (c + 1) * 40].astype(int)
            diffs.append(np.abs(read_tile(fine, g, i).astype(int) - expected).mean())
    assert len(diffs) == 16 and max(diffs) < 1.0


def test_read_tile_pads_with_white_beyond_the_slide_edge() -> None:
    slide = Slide(InMemoryBackend([np.zeros((130, 150, 3), np.uint8)], mpp=1.0))
    direct = make_tile_grid(slide, 1.0, 64)
    assert direct.shape == (3, 3) and direct.direct
    last = read_tile(slide, direct, len(direct) - 1)  # covers x, y in [128, 192)
    assert (last[:2, :22] == 0).all() and (last[2:] == 255).all() and (last[:, 22:] == 255).all()
    resampled = make_tile_grid(slide, 2.0, 32)  # from level 0 by 2x
    assert resampled.shape == (3, 3) and not resampled.direct
    last = read_tile(slide, resampled, len(resampled) - 1)  # x, y in [128, 192) level px
    assert (last[:1, :11] == 0).all() and (last[2:] == 255).all() and (last[:, 12:] == 255).all()


# --------------------------------------------------------------------------- tissue


def test_tissue_filter_measures_the_centre_region() -> None:
    slide = Slide(InMemoryBackend([np.zeros((1000, 1000, 3), np.uint8)], mpp=1.0))
    tissue = Mask(np.zeros((100, 100), bool), 10.0)  # 10 um per mask pixel
    tissue.mask[:, :52] = True  # tissue at x in [0, 520) um
    assert isinstance(tissue, MaskLike)

    grid = make_tile_grid(slide, 1.0, 100, tissue=tissue)  # 10 x 10 cells of 100 um
    assert grid.shape == (10, 10)
    assert sorted(set(grid.cells[:, 1].tolist())) == [0, 1, 2, 3, 4, 5]  # any tissue (> 0)
    col5 = grid.tissue_fraction[grid.cells[:, 1] == 5]
    np.testing.assert_allclose(col5, 0.2, atol=1e-6)  # 20 of 100 um
    assert np.all(grid.tissue_fraction[grid.cells[:, 1] < 5] == 1.0)

    half = make_tile_grid(slide, 1.0, 100, tissue=tissue, min_tissue_fraction=0.5)
    assert sorted(set(half.cells[:, 1].tolist())) == [0, 1, 2, 3, 4]

    # 200 px tiles, stride 100: the centre 100 px of cell (r, c) is x in [100c + 50, 100c + 150)
    centre = make_tile_grid(slide, 1.0, 200, 100, tissue=tissue, min_tissue_fraction=0.5)
    assert sorted(set(centre.cells[:, 1].tolist())) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(centre.tissue_fraction[centre.cells[:, 1] == 4], 0.7, atol=1e-6)
    whole = make_tile_grid(slide, 1.0, 200, 100, tissue=tissue, tissue_region_size=200)
    col4 = whole.tissue_fraction[whole.cells[:, 1] == 4]
    np.testing.assert_allclose(col4, [0.6] * 9 + [0.3], atol=1e-6)  # the last tile is half off the mask

    empty = make_tile_grid(slide, 1.0, 100, tissue=Mask(np.zeros((100, 100), bool), 10.0))
    assert len(empty) == 0 and empty.cells.shape == (0, 2)


def test_tissue_fractions_are_exact_for_fractional_overlap() -> None:
    tissue = Mask(np.array([[True, False], [True, True]]), 4.0)  # 8 x 8 um
    f = tissue_fractions(tissue, np.array([0.0, 2.0, 6.0, 6.0]), np.array([0.0, 2.0, 6.0, -4.0]), 4.0)
    np.testing.assert_allclose(f, [1.0, 0.75, 0.25, 0.0], atol=1e-6)


# --------------------------------------------------------------------------- loader


class RecordingLevel:
    """Array-like level that records the threads reading it, sleeps, and can fail."""

    def __init__(self, image: np.ndarray, delay: float = 0.0, bad_rows: range | None = None) -> None:
        self.image, self.delay, self.bad_rows = image, delay, bad_rows
        self.shape, self.dtype, self.ndim = image.shape, image.dtype, 3
        self.threads: set[str] = set()
        self.reads = 0
        self.lock = threading.Lock()

    def __getitem__(self, key):
        with self.lock:
            self.threads.add(threading.current_thread().name)
            self.reads += 1
        if self.delay:
            time.sleep(self.delay)
        rows = range(*key[0].indices(self.shape[0]))
        if self.bad_rows is not None and rows.start in self.bad_rows:
            raise OSError("corrupt JPEG tile")
        return self.image[key]


def loader_slide(**kwargs) -> tuple[Slide, RecordingLevel]:
    level = RecordingLevel(smooth_image(160, 192, seed=3), **kwargs)
    return Slide(InMemoryBackend([level], mpp=1.0)), level


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_every_index_once_in_batches(workers: int) -> None:
    slide, level = loader_slide()
    grid = make_tile_grid(slide, 1.0, 32)  # 5 x 6 = 30 tiles
    seen, sizes = [], []
    with TileLoader(slide, grid, batch_size=7, workers=workers) as loader:
        assert len(loader) == 5
        for indices, tiles in loader:
            assert indices.dtype == np.int64 and tiles.dtype == np.uint8
            assert tiles.shape == (len(indices), 32, 32, 3)
            for j, i in enumerate(indices):
                np.testing.assert_array_equal(tiles[j], read_tile(slide, grid, int(i)))
            seen.extend(indices.tolist())
            sizes.append(len(indices))
    assert seen == list(range(30)) and sizes == [7, 7, 7, 7, 2]
    if workers:
        assert any(name.startswith("tile-reader") for name in level.threads)

    subset = [29, 3, 17, 4]
    with TileLoader(slide, grid, batch_size=3, indices=subset, workers=workers) as loader:
        assert [b.tolist() for b, _ in loader] == [[29, 3, 17], [4]]
    with pytest.raises(IndexError):
        TileLoader(slide, grid, 4, indices=[30])


def test_loader_reraises_a_read_error_with_the_tile_position() -> None:
    slide, _ = loader_slide(bad_rows=range(64, 96))  # grid row 2 is corrupt
    grid = make_tile_grid(slide, 1.0, 32)
    loader = TileLoader(slide, grid, batch_size=4, workers=2)
    got = []
    with pytest.raises(
        SlideReadError, match=r"tile 12 \(row 2, col 0, at x=0 um, y=64 um\).*corrupt"
    ) as info:
        for indices, _ in loader:
            got.extend(indices.tolist())
    assert info.value.tile_index == 12 and info.value.tile_cell == (2, 0)
    assert got == list(range(12)) and loader.closed
    with pytest.raises(SlideReadError, match="tile 12"):
        list(TileLoader(slide, grid, batch_size=4, workers=0))


def test_close_mid_iteration_returns_promptly() -> None:
    slide, level = loader_slide(delay=0.02)
    grid = make_tile_grid(slide, 1.0, 16)  # 120 slow tiles: ~1.2 s with 2 workers
    loader = TileLoader(slide, grid, batch_size=4, workers=2, prefetch=2)
    iterator = iter(loader)
    indices, _ = next(iterator)
    assert indices.tolist() == [0, 1, 2, 3]
    start = time.perf_counter()
    loader.close()
    assert time.perf_counter() - start < 0.5
    assert list(iterator) == []  # the iteration stops
    time.sleep(0.1)
    reads = level.reads
    time.sleep(0.1)
    assert level.reads == reads < 40  # nothing more is read
    loader.close()  # idempotent

    # closing from another thread while the consumer waits for a batch
    slide, _ = loader_slide(delay=0.05)
    loader = TileLoader(slide, make_tile_grid(slide, 1.0, 16), batch_size=8, workers=1)
    threading.Timer(0.1, loader.close).start()
    start = time.perf_counter()
    batches = list(loader)
    assert time.perf_counter() - start < 1.5 and len(batches) < 15


# --------------------------------------------------------------------------- tensors


def test_to_tensor_normalisations() -> None:
    tiles = np.zeros((2, 4, 5, 3), np.uint8)
    tiles[0, ..., 0] = 255  # red
    tiles[1] = 51
    assert NORMALIZATIONS == ("imagenet", "liu", "unit")
    unit = to_tensor(tiles, "unit")
    assert unit.shape == (2, 3, 4, 5) and unit.dtype == torch.float32 and unit.is_contiguous()
    assert unit[0, 0].eq(1).all() and unit[0, 1:].eq(0).all() and torch.allclose(unit[1], torch.tensor(0.2))
    liu = to_tensor(tiles, "liu")
    assert liu[0, 0].eq(1).all() and liu[0, 1].eq(-1).all() and liu.min() >= -1 and liu.max() <= 1
    imagenet = to_tensor(tiles, "imagenet")
    for ch in range(3):
        expected = (0.2 - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch]
        assert torch.allclose(imagenet[1, ch], torch.tensor(expected))
    assert to_tensor(tiles[0], "unit").shape == (1, 3, 4, 5)
    with pytest.raises(ValueError, match="unknown normalization"):
        to_tensor(tiles, "zscore")
    with pytest.raises(ValueError, match="RGB"):
        to_tensor(np.zeros((2, 4, 4), np.uint8), "unit")


def test_dihedral_gives_eight_orientations_and_tta_averages_them() -> None:
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)  # no symmetry
    views = [dihedral(x, k) for k in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert torch.equal(views[0], x)
    assert torch.equal(views[1], torch.rot90(x, 1, (-2, -1)))
    assert torch.equal(views[4], torch.flip(x, (-1,)))
    assert torch.equal(views[6], torch.flip(torch.rot90(x, 2, (-2, -1)), (-1,)))
    rect = torch.zeros(1, 3, 4, 6)
    assert dihedral(rect, 1).shape == (1, 3, 6, 4)
    with pytest.raises(ValueError):
        dihedral(x, 8)

    weights = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))

    def fn(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1) @ weights  # orientation-dependent, (B, 4)

    expected = torch.stack([fn(v) for v in views]).mean(0)
    assert torch.allclose(tta_mean(fn, x), expected, atol=1e-5)
    assert not torch.allclose(fn(x), expected)


def test_one_level_rule_for_tiles_patches_nucleus_patches_and_whole_slide_reads() -> None:
    from napari_pathology.nuclei.classify import nucleus_patches
    from napari_pathology.progress import run_to_completion
    from napari_pathology.tiles import level_for_mpp, read_box, read_patch
    from napari_pathology.tissue import read_at_mpp

    rng = np.random.default_rng(3)
    level0 = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    level1 = level0.reshape(32, 2, 48, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    slide = Slide(InMemoryBackend([level0, level1], mpp=0.5))
    assert [level_for_mpp(slide, m) for m in (0.5, 0.9, 1.0, 1.04, 3.0)] == [0, 0, 1, 1, 1]
    assert level_for_mpp(slide, 1.005, tolerance=0.0) == 1 and level_for_mpp(slide, 0.99, tolerance=0.0) == 0
    with pytest.raises(ValueError, match=r"\(0\.5 um/px at full resolution\) cannot reach the model's 0\.25"):
        level_for_mpp(slide, 0.25)
    assert level_for_mpp(slide, 0.25, enlarge=True) == 0  # readers that enlarge say so
    # a patch at 1 um/px is level 1 as it is; the same box read by hand gives the same pixels
    np.testing.assert_array_equal(read_patch(slide, (16.0, 16.0), 8, 1.0), level1[12:20, 12:20])
    np.testing.assert_array_equal(
        read_box(slide, 1, (12.0, 12.0, 8.0, 8.0), (8, 8), direct=True), level1[12:20, 12:20]
    )
    # nucleus patches (16 px of 1 um/px) and a whole-slide read at 1 um/px read that level too
    patch = nucleus_patches(slide, np.array([[16.0, 16.0]]), context_um=16.0, size=16, equalize="none")
    np.testing.assert_array_equal(patch[0], level1[8:24, 8:24])
    np.testing.assert_array_equal(run_to_completion(read_at_mpp(slide, 1.0)), level1)
    # enlarging (bilinear) where the slide is coarser than the patches: no error, every pixel filled
    fine = nucleus_patches(slide, np.array([[16.0, 16.0]]), context_um=4.0, size=16, equalize="none")
    assert fine.shape == (1, 16, 16, 3) and fine.std() > 0
