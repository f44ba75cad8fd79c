"""The fast tissue filters give exactly what the plain scikit-image / SciPy ones give."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.filters.rank import median
from skimage.morphology import disk

from napari_pathology.progress import run_to_completion
from napari_pathology.slide import InMemoryBackend, NotBrightfieldError, Slide
from napari_pathology.tissue import (
    TissueMask,
    TissueParams,
    detect_tissue,
    filters,
    pen_mask,
    read_at_mpp,
    tissue_mask_from_rgb,
)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _blobs(shape: tuple[int, int], seed: int, fraction: float = 0.5) -> np.ndarray:
    field = ndimage.gaussian_filter(_rng(seed).random(shape), 3)
    return field > np.quantile(field, 1 - fraction)


@pytest.mark.parametrize("size", [1, 3, 7, 11, 17])
def test_majority_is_the_thresholded_rank_median(size: int) -> None:
    for seed, shape in enumerate([(40, 53), (2, 30), (9, 5), (1, 12), (16, 16)]):
        image = _rng(seed).integers(0, 24, shape).astype(np.uint8)
        reference = median(image, footprint=np.ones((size, size), bool)) if min(shape) >= 2 else image
        for threshold in (3, 8.0, 11.5, 20):
            expected = reference > threshold if size > 1 else image > threshold
            assert np.array_equal(filters.median_above(image, threshold, size), expected), (shape, threshold)


@pytest.mark.parametrize("radius", range(0, 13))
def test_disk_rectangles_make_the_disk(radius: int) -> None:
    union = np.zeros((2 * radius + 1, 2 * radius + 1), bool)
    for half_h, half_w in filters.disk_rectangles(radius):
        union[radius - half_h : radius + half_h + 1, radius - half_w : radius + half_w + 1] = True
    assert np.array_equal(union, disk(radius).astype(bool))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 9, 13])
def test_closing_is_the_padded_scipy_closing(size: int) -> None:
    for seed, shape in enumerate([(60, 47), (3, 40), (20, 1)]):
        mask = _rng(seed).random(shape) > 0.7
        radius = size // 2
        if size <= 1:
            expected = mask
        else:
            padded = np.pad(mask, radius, mode="edge")
            closed = ndimage.binary_closing(padded, structure=disk(radius))
            expected = closed[radius:-radius, radius:-radius] | mask
        assert np.array_equal(filters.closing(mask, size), expected), shape


def _fill_reference(mask: np.ndarray, max_hole: float | None) -> np.ndarray:
    filled = ndimage.binary_fill_holes(mask)
    if max_hole is None:
        return filled
    labels, n = ndimage.label(filled & ~mask)
    small = np.bincount(labels.ravel(), minlength=n + 1) <= max_hole
    small[0] = False
    return mask | small[labels]


def _small_reference(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_pixels
    keep[0] = False
    return keep[labels]


@pytest.mark.parametrize("loop_pieces", [0, 10_000])  # one gather over the image, or a loop over boxes
def test_hole_filling_and_speck_removal_match_labelling(monkeypatch, loop_pieces: int) -> None:
    monkeypatch.setattr(filters, "_LOOP_PIECES", loop_pieces)
    for seed in range(4):
        mask = _rng(seed).random((70, 90)) > [0.3, 0.5, 0.7, 0.9][seed]
        for max_hole in (None, 0, 1, 3, 12):
            assert np.array_equal(filters.fill_holes(mask, max_hole), _fill_reference(mask, max_hole))
        for min_pixels in (0, 2, 5, 30, 1e9):
            assert np.array_equal(filters.remove_small(mask, min_pixels), _small_reference(mask, min_pixels))


def test_saturation_is_opencvs() -> None:
    rgb = _rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    mx, mn = rgb.max(axis=-1).astype(np.float32), rgb.min(axis=-1).astype(np.float32)
    expected = np.rint(np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0) * 255).astype(np.uint8)
    assert np.array_equal(filters.saturation_u8(rgb), expected)
    assert np.array_equal(filters.saturation_above(rgb, 40.5), expected > 40.5)


def test_candidate_boxes_hold_every_candidate_with_a_margin() -> None:
    candidate = np.zeros((700, 900), bool)
    candidate[10:30, 20:40] = True  # near the border
    candidate[300:420, 500:530] = True
    candidate[650, 880] = True
    margin = 40
    boxes = filters.candidate_boxes(candidate, margin, block=32)
    assert len(boxes) == 3
    covered = np.zeros_like(candidate)
    for box in boxes:
        assert not covered[box].any()  # disjoint
        covered[box] = True
        rows, cols = box
        inner = candidate[box]
        ys, xs = np.nonzero(inner)
        if rows.start > 0:
            assert ys.min() >= margin
        if rows.stop < candidate.shape[0]:
            assert rows.stop - rows.start - 1 - ys.max() >= margin
        if cols.start > 0:
            assert xs.min() >= margin
        if cols.stop < candidate.shape[1]:
            assert cols.stop - cols.start - 1 - xs.max() >= margin
    assert not (candidate & ~covered).any()
    assert filters.candidate_boxes(np.zeros((50, 50), bool), margin) == []


def _reference_mask(rgb: np.ndarray, mpp: float, params: TissueParams) -> np.ndarray:
    """The whole-image pipeline written with the plain filters (what detection computed before)."""

    def odd(pixels: float) -> int:
        n = max(1, round(pixels))
        return n if n % 2 else n + 1

    size = odd(params.median_um / mpp)
    sat = filters.saturation_u8(rgb)
    blurred = median(sat, footprint=np.ones((size, size), bool)) if size > 1 else sat
    mask = blurred > params.saturation_threshold
    radius = odd(params.closing_um / mpp) // 2
    if radius and mask.any():
        padded = np.pad(mask, radius, mode="edge")
        mask = ndimage.binary_closing(padded, structure=disk(radius))[radius:-radius, radius:-radius] | mask
    pixel_mm2 = (mpp / 1000.0) ** 2
    mask = _fill_reference(mask, None if params.fill_holes else params.min_hole_area_mm2 / pixel_mm2)
    if params.exclude_pen:
        ink = pen_mask(rgb)
        if ink.any():
            ink = ndimage.binary_dilation(ink, structure=np.ones((3, 3), bool))
            mask &= ~ink
            mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool)) | (
                mask & ~ndimage.binary_dilation(ink, iterations=3)
            )
    return _small_reference(mask, params.min_tissue_area_mm2 / pixel_mm2)


def _sparse_slide_image(seed: int) -> np.ndarray:
    """White glass with a few separate pink pieces (holes, specks, one green pen stroke)."""
    rng = _rng(seed)
    rgb = np.full((600, 800, 3), 242, np.uint8)
    for y, x in ((40, 60), (300, 500), (480, 120), (560, 760)):
        piece = _blobs((90, 110), seed + y, 0.55)
        colour = np.array([205, 125, 185]) + rng.integers(-25, 25, (90, 110, 3))
        region = rgb[y : y + 90, x : x + 110] if y + 90 <= 600 and x + 110 <= 800 else None
        if region is None:
            piece, colour = piece[: 600 - y, : 800 - x], colour[: 600 - y, : 800 - x]
            region = rgb[y:, x:]
        region[piece] = np.clip(colour[piece], 0, 255)
    rgb[320:324, 480:640] = (40, 150, 70)  # pen across a piece
    noise = rng.integers(-5, 6, rgb.shape)
    return np.clip(rgb.astype(int) + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "params",
    [
        TissueParams(),
        TissueParams(median_um=24.0, closing_um=56.0, min_tissue_area_mm2=0.001, min_hole_area_mm2=0.001),
        TissueParams(exclude_pen=True, min_tissue_area_mm2=0.002),
        TissueParams(fill_holes=True, saturation_threshold=20.0),
    ],
)
def test_the_mask_in_boxes_is_the_whole_image_mask(params: TissueParams) -> None:
    for seed in range(1 if params.exclude_pen else 2):  # pen removal is slow (float HSV)
        rgb = _sparse_slide_image(seed)
        for mpp in (8.0,) if params.exclude_pen else (4.0, 8.0):
            ours = tissue_mask_from_rgb(rgb, mpp, params).mask
            assert ours.any()
            assert np.array_equal(ours, _reference_mask(rgb, mpp, params)), (seed, mpp)


def test_a_level_on_the_target_grid_is_read_as_it_is() -> None:
    level0 = _rng(3).integers(0, 256, (300, 500, 3)).astype(np.uint8)
    level1 = _rng(4).integers(0, 256, (75, 125, 3)).astype(np.uint8)
    slide = Slide(InMemoryBackend([level0, level1], mpp=2.0))
    assert np.array_equal(run_to_completion(read_at_mpp(slide, 8.0, block=64)), level1)
    assert np.array_equal(run_to_completion(read_at_mpp(slide, 2.0, block=128)), level0)
    # a grid between levels still averages (level 0, 2x2 -> 1)
    halved = run_to_completion(read_at_mpp(slide, 4.0))
    expected = level0.reshape(150, 2, 250, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(halved.astype(int) - np.rint(expected)).max() <= 1


def test_area_counts_the_parts_of_edge_pixels_on_the_slide() -> None:
    rng = _rng(5)
    for _ in range(50):
        rows, cols = rng.integers(1, 30, 2)
        mask = rng.random((rows, cols)) > 0.4
        width, height = int(rng.integers(1, cols * 16 + 1)), int(rng.integers(1, rows * 16 + 1))
        tissue = TissueMask(mask, 8.0, (width, height), 0.5)
        whole = tissue.fraction_in(0, 0, width * 0.5, height * 0.5) * width * 0.5 * height * 0.5 / 1e6
        assert tissue.area_mm2 == pytest.approx(whole, rel=1e-9, abs=1e-15)


def _two_level_slide(level1: np.ndarray) -> Slide:
    """A slide at 2 um/px whose second level (4x) is exactly an 8 um/px mask's grid."""
    level0 = np.repeat(np.repeat(level1, 4, axis=0), 4, axis=1)
    return Slide(InMemoryBackend([level0, level1], mpp=2.0))


def test_the_brightfield_judgement_reuses_the_masks_read_of_the_coarsest_level() -> None:
    rgb = _sparse_slide_image(0)[:200, :240]
    slide = _two_level_slide(rgb)
    reads, read_region = [], slide.read_region
    slide.read_region = lambda level, *box: reads.append(level) or read_region(level, *box)
    events = []
    mask = run_to_completion(detect_tissue(slide, TissueParams()), events.append)
    assert len(events) >= 2 and not mask.is_empty
    assert reads == [1]  # the coarsest level, once
    assert slide.brightfield is True
    assert slide.brightfield == _two_level_slide(rgb).brightfield  # the same as judging from a read

    dark = np.clip(_rng(5).normal(8, 4, (200, 240, 3)), 0, 255).astype(np.uint8)
    for y in range(10, 200, 20):
        dark[y - 2 : y + 2, 10:240:20] = (20, 60, 230)  # bright nuclei, one pixel wide at this scale
    fluorescence = _two_level_slide(dark)
    with pytest.raises(NotBrightfieldError, match="fluorescence"):
        next(detect_tissue(fluorescence, TissueParams()))  # refused before any progress
    assert _two_level_slide(dark).brightfield is False
