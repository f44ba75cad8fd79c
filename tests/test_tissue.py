"""Tissue masks: detectors against synthetic ground truth, pen marks, geometry, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from conftest import real_file
from napari_pathology.geometry import polygon_area
from napari_pathology.progress import Progress, run_to_completion
from napari_pathology.slide import InMemoryBackend, Slide, SlideOpenError, open_slide
from napari_pathology.slide.synthetic import load_truth, write_synthetic_slide
from napari_pathology.tissue import (
    METHODS,
    TissueMask,
    TissueParams,
    detect_tissue,
    load_tissue_mask,
    pen_mask,
    read_at_mpp,
    read_tissue_file,
    save_tissue_mask,
    tissue_mask_from_geojson,
    tissue_mask_from_image,
    tissue_mask_from_rgb,
    write_tissue_outputs,
)

PINK = (215, 140, 190)
WHITE = 245


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def truth_mask(truth) -> np.ndarray:
    return np.asarray(Image.open(truth.tissue_png)) > 0


def detect(slide: Slide, **params) -> TissueMask:
    return run_to_completion(detect_tissue(slide, TissueParams(**params)))


@pytest.fixture(scope="module")
def slide(synthetic_slide):
    with open_slide(synthetic_slide.slide_path) as opened:
        yield opened


@pytest.fixture(scope="module")
def saturation_mask(slide) -> TissueMask:
    return detect(slide)


# --------------------------------------------------------------------------- detectors


@pytest.mark.parametrize("method", METHODS)
def test_each_method_matches_the_synthetic_truth(slide, synthetic_slide, method) -> None:
    events: list[Progress] = []
    mask = run_to_completion(detect_tissue(slide, TissueParams(method=method)), events.append)
    truth = truth_mask(synthetic_slide)
    assert mask.mpp == 8.0 and mask.slide_size == (3072, 3072) and mask.slide_mpp == (0.5, 0.5)
    assert mask.method == method and mask.params["method"] == method
    assert iou(mask.resampled(synthetic_slide.mask_mpp).mask, truth) >= 0.9
    # progress: one event per block read, counting up to the total
    assert len(events) >= 3 and events[-1].done == events[-1].total
    assert all(e.done <= e.total for e in events)


def test_mask_at_another_resolution_lines_up_with_the_truth(slide, synthetic_slide) -> None:
    fine = detect(slide, mask_mpp=4.0)
    assert fine.shape == (384, 384)
    assert iou(fine.resampled(synthetic_slide.mask_mpp).mask, truth_mask(synthetic_slide)) >= 0.9


def test_area_matches_the_truth(saturation_mask, synthetic_slide) -> None:
    truth = load_truth(synthetic_slide.slide_path)
    assert saturation_mask.area_mm2 == pytest.approx(truth["tissue_area_mm2"], rel=0.1)
    assert not saturation_mask.is_empty


def test_read_at_mpp_is_an_exact_area_average() -> None:
    rng = np.random.default_rng(0)
    level0 = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    level1 = level0.reshape(45, 2, 60, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    slide = Slide(InMemoryBackend([level0, level1], mpp=0.4))
    # 1.0 um/px = 2.5 level-0 px: read from level 1 (0.8 um/px), 1.25 level px per output px
    out = run_to_completion(read_at_mpp(slide, 1.0, block=16))
    assert out.shape == (36, 48, 3)
    fine = np.kron(level1.astype(float), np.ones((4, 4, 1)))  # 0.2 um/px: 5x5 per output px
    expected = fine.reshape(36, 5, 48, 5, 3).mean(axis=(1, 3))
    assert np.abs(out - expected).max() <= 0.51
    # integer factor straight from level 0, and a grid that does not divide the slide
    out = run_to_completion(read_at_mpp(slide, 0.8 * 3))
    assert out.shape == (15, 20, 3)
    expected = level1.astype(float).reshape(15, 3, 20, 3, 3).mean(axis=(1, 3))
    assert np.abs(out - expected).max() <= 0.51
    out = run_to_completion(read_at_mpp(slide, 7 * 0.4))
    assert out.shape == (13, 18, 3)  # 90/7 and 120/7 rounded up; the last row/column averages what exists
    from_level1 = np.kron(level1.astype(float), np.ones((2, 2, 1)))  # level 1 on the level-0 grid
    assert np.abs(out[-1, 0] - from_level1[84:, :7].reshape(-1, 3).mean(axis=0)).max() <= 0.51
    assert np.abs(out[0, -1] - from_level1[:7, 119:].reshape(-1, 3).mean(axis=0)).max() <= 0.51


def test_white_slide_gives_an_empty_mask_not_an_error() -> None:
    slide = Slide(InMemoryBackend([np.full((1024, 1536, 3), 255, np.uint8)], mpp=0.5))
    for method in METHODS:
        for threshold in (8.0, None):
            mask = detect(slide, method=method, saturation_threshold=threshold)
            assert mask.is_empty and mask.area_mm2 == 0.0
            assert mask.polygons() == [] and mask.to_geojson()["features"] == []
            assert mask.fraction_in(0, 0, 100, 100) == 0.0


def test_slide_without_mpp_names_the_slide_panel() -> None:
    slide = Slide(InMemoryBackend([np.full((256, 256, 3), 200, np.uint8)]))
    with pytest.raises(SlideOpenError, match="Slide panel") as info:
        run_to_completion(detect_tissue(slide))
    assert slide.name in str(info.value)


def test_params_are_validated() -> None:
    with pytest.raises(ValueError, match="saturation, otsu, gray"):
        TissueParams(method="magic")
    with pytest.raises(ValueError, match="mask_mpp"):
        TissueParams(mask_mpp=0)
    params = TissueParams(method="gray", exclude_pen=True)
    assert TissueParams.from_dict(params.to_dict() | {"unknown": 1}) == params


def _pieces_slide() -> Slide:
    """1 um/px slide: a small (0.0049 mm^2) and a larger (0.0225 mm^2) piece, plus a 0.6 mm
    square with a small (0.0064 mm^2) and a large (0.0625 mm^2) hole."""
    image = np.full((1600, 1600, 3), WHITE, np.uint8)
    image[100:170, 100:170] = PINK  # 70 um side
    image[100:250, 400:550] = PINK  # 150 um side
    image[700:1300, 700:1300] = PINK
    image[800:880, 800:880] = WHITE  # 80 um hole
    image[1000:1250, 1000:1250] = WHITE  # 250 um hole
    return Slide(InMemoryBackend([image], mpp=1.0))


@pytest.mark.parametrize("mask_mpp", [4.0, 8.0])
def test_area_filters_are_physical(mask_mpp) -> None:
    slide = _pieces_slide()
    mask = detect(slide, mask_mpp=mask_mpp, min_tissue_area_mm2=0.01, min_hole_area_mm2=0.02)

    def frac(x0, y0, x1, y1):
        return mask.fraction_in(x0, y0, x1, y1)

    assert frac(110, 110, 160, 160) == 0.0  # small piece dropped
    assert frac(420, 120, 530, 230) == 1.0  # larger piece kept
    assert frac(810, 810, 870, 870) == 1.0  # small hole filled
    assert frac(1020, 1020, 1230, 1230) == 0.0  # large hole kept
    expected = (0.0225 + 0.36 - 0.0625) * 1e6  # um^2
    assert mask.area_mm2 * 1e6 == pytest.approx(expected, rel=0.06)
    filled = detect(slide, mask_mpp=mask_mpp, min_tissue_area_mm2=0.001, fill_holes=True)
    assert filled.fraction_in(110, 110, 160, 160) > 0.95  # kept under a smaller filter
    assert filled.fraction_in(1020, 1020, 1230, 1230) == 1.0


# --------------------------------------------------------------------------- pen marks


@pytest.fixture(scope="module", params=[1, 2], ids=["blue-pen", "green-pen"])
def pen_slide(request, tmp_path_factory):
    from napari_pathology.slide.synthetic import _F_PEN, _build_scene

    path = tmp_path_factory.mktemp("pen") / f"pen{request.param}.tif"
    truth = write_synthetic_slide(path, size=3072, seed=request.param, pen_mark=True)
    # the generator's own pen field on the mask grid: exact ink ground truth
    scene = _build_scene(3072, 3072, 0.5, request.param, False, "macro", True, False)
    ink = scene.fields[_F_PEN] > 0
    with open_slide(path) as slide:
        yield slide, truth, ink


def test_exclude_pen_on_a_synthetic_slide(pen_slide) -> None:
    slide, truth, ink = pen_slide
    tissue = truth_mask(truth)
    assert ink.sum() > 500
    plain = detect(slide).mask
    cleaned = detect(slide, exclude_pen=True).mask
    assert plain[ink].mean() > 0.9  # ink looks like tissue to the saturation rule...
    assert cleaned[ink].mean() < 0.02  # ...and is gone with exclude_pen
    assert iou(cleaned, tissue & ~ink) >= 0.88
    assert (cleaned & plain & ~ink).sum() / (plain & ~ink).sum() > 0.97  # tissue kept


def _strong_ink(rgb: np.ndarray) -> np.ndarray:
    """Obvious green, blue and red ink, by simple colour rules independent of pen_mask."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    green = g > r + 25
    blue = (g > r + 15) & (b > g + 30)
    red = (r > 150) & (g < 60) & (b < 90)
    return green | blue | red


@pytest.mark.parametrize(
    ("name", "mpp"),
    [
        ("tcga-green-pen.png", 2.0),
        ("tcga-red-pen.png", 2.0),
        ("wsi-blue-pen.png", 100.0),
        ("diagnostic-slide-thumb-rgb.png", 32.0),
    ],
)
def test_exclude_pen_on_real_thumbnails(name, mpp) -> None:
    rgb = np.asarray(Image.open(real_file(f"thumbnails/{name}")).convert("RGB"))
    ink = _strong_ink(rgb)
    assert ink.sum() > 500
    plain = tissue_mask_from_rgb(rgb, mpp).mask
    cleaned = tissue_mask_from_rgb(rgb, mpp, TissueParams(exclude_pen=True)).mask
    assert plain[ink].mean() > 0.9
    assert cleaned[ink].mean() < 0.02
    away = plain & ~ndimage.binary_dilation(ink, iterations=5)
    assert (cleaned & away).sum() / away.sum() > 0.9


def test_pen_mask_leaves_plain_he_alone() -> None:
    rgb = np.asarray(Image.open(real_file("thumbnails/tcga-lung-rgb.png")).convert("RGB"))
    assert pen_mask(rgb).mean() < 0.01
    assert pen_mask(np.full((8, 8, 3), 255, np.uint8)).sum() == 0


# --------------------------------------------------------------------------- fractions


def _brute_fraction(mask: TissueMask, box) -> float:
    """Exact tissue fraction from per-pixel overlaps (slow, obviously right)."""
    x0, y0, x1, y1 = box
    width_um, height_um = mask.slide_size_um
    rows, cols = mask.shape
    edges_x = np.arange(cols + 1) * mask.mpp
    edges_y = np.arange(rows + 1) * mask.mpp
    ox = np.clip(np.minimum(edges_x[1:], min(x1, width_um)) - np.maximum(edges_x[:-1], max(x0, 0)), 0, None)
    oy = np.clip(np.minimum(edges_y[1:], min(y1, height_um)) - np.maximum(edges_y[:-1], max(y0, 0)), 0, None)
    return float(oy @ mask.mask.astype(float) @ ox) / ((x1 - x0) * (y1 - y0))


def test_fractions_agree_with_brute_force() -> None:
    rng = np.random.default_rng(3)
    # anisotropic slide, and a mask whose last row/column reach past the slide
    mask = TissueMask(rng.random((40, 57)) > 0.5, 8.0, (900, 1260), (0.5, 0.25))
    x0 = rng.uniform(-60, 470, 300)
    y0 = rng.uniform(-60, 330, 300)
    boxes = np.stack([x0, y0, x0 + rng.uniform(1, 120, 300), y0 + rng.uniform(1, 120, 300)], axis=1)
    fast = mask.fractions(boxes)
    slow = np.array([_brute_fraction(mask, b) for b in boxes])
    np.testing.assert_allclose(fast, slow, atol=1e-9)
    assert mask.fraction_in(*boxes[7]) == pytest.approx(slow[7])
    assert mask.fractions(np.zeros((0, 4))).shape == (0,)
    assert mask.fractions([[10, 10, 10, 50]])[0] == 0.0  # empty box
    full = mask.fractions([[0, 0, 450, 315]])[0]
    assert full * 450 * 315 / 1e6 == pytest.approx(mask.area_mm2)


# --------------------------------------------------------------------------- files


def test_save_and_load_round_trip(saturation_mask, tmp_path) -> None:
    paths = save_tissue_mask(saturation_mask, tmp_path / "out")
    assert {p.name for p in paths.values()} == {"tissue.png", "tissue.json", "tissue.geojson"}
    png = np.asarray(Image.open(paths["png"]))
    assert set(np.unique(png)) <= {0, 255}
    info = json.loads(paths["json"].read_text())
    assert info["mpp"] == 8.0 and info["slide_size"] == [3072, 3072] and info["slide_mpp"] == [0.5, 0.5]
    assert info["method"] == "saturation" and info["params"]["median_um"] == 56.0
    assert info["area_mm2"] == pytest.approx(saturation_mask.area_mm2)
    geojson = json.loads(paths["geojson"].read_text())
    assert geojson["features"][0]["properties"]["classification"]["name"] == "Tissue"
    for path in (paths["png"], paths["json"]):
        loaded = load_tissue_mask(path)
        np.testing.assert_array_equal(loaded.mask, saturation_mask.mask)
        assert loaded.mpp == saturation_mask.mpp and loaded.slide_size == saturation_mask.slide_size
        assert loaded.slide_mpp == saturation_mask.slide_mpp and loaded.params == saturation_mask.params


def test_loading_broken_or_mismatched_files_says_why(saturation_mask, tmp_path) -> None:
    paths = save_tissue_mask(saturation_mask, tmp_path, stem="a")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(paths["png"])
    with pytest.raises(ValueError, match="do not belong together"):
        load_tissue_mask(paths["png"])
    paths["json"].write_text("{not json")
    with pytest.raises(ValueError, match=r"tissue mask description .*a\.json is not valid JSON"):
        load_tissue_mask(paths["json"])
    lone = tmp_path / "lone.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(lone)
    with pytest.raises(FileNotFoundError, match=r"lone\.json"):
        load_tissue_mask(lone)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"junk\.png"):
        tissue_mask_from_image(tmp_path / "junk.png", (100, 100), 1.0)


def test_geojson_import_equals_the_mask_it_came_from(saturation_mask, tmp_path) -> None:
    polygons = saturation_mask.polygons()
    # level-0 pixels: inside the slide, same area as the mask
    xs = np.concatenate([p[0][:, 0] for p in polygons])
    assert xs.min() >= 0 and xs.max() <= 3072
    area_px = sum(polygon_area(p) for p in polygons)
    assert area_px * 0.25 / 1e6 == pytest.approx(saturation_mask.mask.sum() * 64 / 1e6, rel=0.01)
    back = tissue_mask_from_geojson(saturation_mask.to_geojson(), (3072, 3072), 0.5)
    assert iou(back.mask, saturation_mask.mask) > 0.95
    path = save_tissue_mask(saturation_mask, tmp_path)["geojson"]
    finer = tissue_mask_from_geojson(path, (3072, 3072), (0.5, 0.5), mask_mpp=4.0)
    assert finer.shape == (384, 384)
    assert iou(finer.resampled(8.0).mask, saturation_mask.mask) > 0.95


def test_geojson_errors_are_clear(tmp_path) -> None:
    with pytest.raises(ValueError, match="no Polygon"):
        tissue_mask_from_geojson({"type": "FeatureCollection", "features": []}, (100, 100), 1.0)
    far = {"type": "Polygon", "coordinates": [[[5000, 5000], [5100, 5000], [5100, 5100], [5000, 5000]]]}
    with pytest.raises(ValueError, match="outside"):
        tissue_mask_from_geojson(far, (1000, 1000), 1.0)
    bad = tmp_path / "bad.geojson"
    bad.write_text("[{]")
    with pytest.raises(ValueError, match=r"bad\.geojson"):
        tissue_mask_from_geojson(bad, (100, 100), 1.0)


def test_mask_image_is_stretched_over_the_slide(synthetic_slide, tmp_path) -> None:
    truth = truth_mask(synthetic_slide)
    mask = tissue_mask_from_image(synthetic_slide.tissue_png, (3072, 3072), 0.5)
    assert mask.mpp == pytest.approx(8.0) and mask.method == "image"
    np.testing.assert_array_equal(mask.mask, truth)
    # an RGBA image whose alpha carries the mask, at another size
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[..., 3] = np.asarray(Image.fromarray(truth.astype(np.uint8) * 255).resize((96, 96), Image.NEAREST))
    half = tissue_mask_from_image(rgba, (3072, 3072), 0.5)
    assert half.mpp == pytest.approx(16.0)
    assert iou(half.resampled(8.0).mask, truth) > 0.9
    with pytest.raises(ValueError, match="aspect ratio"):
        tissue_mask_from_image(np.ones((10, 30), bool), (3072, 3072), 0.5)


def test_read_tissue_file_dispatches_and_checks_the_slide(saturation_mask, tmp_path) -> None:
    paths = save_tissue_mask(saturation_mask, tmp_path)
    for path in paths.values():
        mask = read_tissue_file(path, (3072, 3072), 0.5)
        assert iou(mask.mask, saturation_mask.mask) > 0.95
    with pytest.raises(ValueError, match="3072x3072"):
        read_tissue_file(paths["json"], (2048, 2048), 0.5)
    with pytest.raises(FileNotFoundError):
        read_tissue_file(tmp_path / "nope.geojson", (3072, 3072), 0.5)


def test_anisotropic_slide_geometry() -> None:
    # 0.5 um/px across, 0.25 um/px down: 800 x 800 um, tissue in x 200-600 um, y 300-700 um
    image = np.full((3200, 1600, 3), WHITE, np.uint8)
    image[1200:2800, 400:1200] = PINK
    slide = Slide(InMemoryBackend([image], mpp=(0.5, 0.25)))
    mask = detect(slide, mask_mpp=10.0, median_um=0, closing_um=0)
    assert mask.shape == (80, 80)
    assert mask.fraction_in(200, 300, 600, 700) == pytest.approx(1.0)
    assert mask.area_mm2 == pytest.approx(0.16, rel=0.01)
    [polygon] = mask.polygons()
    xs, ys = polygon[0][:, 0], polygon[0][:, 1]
    assert (xs.min(), xs.max()) == pytest.approx((400, 1200))  # level-0 px across
    assert (ys.min(), ys.max()) == pytest.approx((1200, 2800))  # level-0 px down


def test_write_tissue_outputs(synthetic_slide, tmp_path) -> None:
    job = write_tissue_outputs(synthetic_slide.slide_path, tmp_path / "t", TissueParams(method="otsu"))
    messages: list[str] = []
    paths = run_to_completion(job, lambda e: messages.append(e.message))
    assert all(p.exists() for p in paths.values())
    assert any("tissue" in m and "mm^2" in m for m in messages)
    mask = load_tissue_mask(paths["json"])
    assert mask.method == "otsu" and not mask.is_empty
