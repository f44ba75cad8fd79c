from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image
from skimage.measure import points_in_poly

from napari_pathology.geometry import geojson_to_polygons, rasterize_polygons
from napari_pathology.progress import Progress
from napari_pathology.slide import synthetic
from napari_pathology.slide.synthetic import (
    GENERATOR,
    SyntheticTruth,
    generate_synthetic_slide,
    load_truth,
    truth_paths,
    write_synthetic_slide,
)

MPP = 0.5


@pytest.fixture(scope="module")
def tumour_slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticTruth:
    return write_synthetic_slide(tmp_path_factory.mktemp("synth") / "pos.tif", 3072, seed=7)


@pytest.fixture(scope="module")
def negative_slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticTruth:
    out = tmp_path_factory.mktemp("synth") / "neg.tif"
    return write_synthetic_slide(out, (2560, 2048), seed=3, negative=True)


@pytest.fixture(scope="module")
def micro_slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticTruth:
    out = tmp_path_factory.mktemp("synth") / "micro.tif"
    return write_synthetic_slide(out, 2048, seed=5, tumour_size="micro")


def read_nuclei(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["x_um", "y_um", "label", "radius_um", "kind"]
        rows = list(reader)
    return {
        "x": np.array([float(r["x_um"]) for r in rows]),
        "y": np.array([float(r["y_um"]) for r in rows]),
        "r": np.array([float(r["radius_um"]) for r in rows]),
        "label": np.array([r["label"] for r in rows]),
        "kind": np.array([r["kind"] for r in rows]),
    }


def read_mask(path: Path) -> np.ndarray:
    arr = np.asarray(Image.open(path))
    assert arr.dtype == np.uint8 and set(np.unique(arr)) <= {0, 255}
    return arr > 0


def inside_polygons(polygons: list, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    pts = np.stack([x, y], 1)
    inside = np.zeros(len(pts), dtype=bool)
    for polygon in polygons:
        hit = points_in_poly(pts, polygon[0])
        for hole in polygon[1:]:
            hit &= ~points_in_poly(pts, hole)
        inside |= hit
    return inside


def tile_hashes(path: Path) -> list[list[str]]:
    out = []
    with tifffile.TiffFile(path) as tif:
        fh = tif.filehandle
        for page in tif.pages:
            hashes = []
            for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
                fh.seek(offset)
                hashes.append(hashlib.sha1(fh.read(count)).hexdigest())
            out.append(hashes)
    return out


# ----------------------------------------------------------------------------- the file


def test_openslide_reads_generic_tiff_with_mpp_and_levels(tumour_slide: SyntheticTruth) -> None:
    slide = openslide.OpenSlide(tumour_slide.slide_path)
    try:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP, abs=1e-3)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(MPP, abs=1e-3)
        assert slide.dimensions == (3072, 3072)
        assert slide.level_count == 3
        assert slide.level_dimensions[1] == (1536, 1536)
        assert slide.level_downsamples[2] == pytest.approx(4.0)
    finally:
        slide.close()
    with tifffile.TiffFile(tumour_slide.slide_path) as tif:
        assert len(tif.pages) == 3
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 256 and page.compression == 7
        assert all(p.subfiletype == 1 for p in tif.pages[1:])


def test_pixels_look_like_h_and_e(tumour_slide: SyntheticTruth) -> None:
    truth = load_truth(tumour_slide.slide_path)
    tissue = read_mask(tumour_slide.tissue_png)
    d = truth["mask_downsample"]
    slide = openslide.OpenSlide(tumour_slide.slide_path)
    try:
        level1 = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1]).convert("RGB"))
        nuclei = read_nuclei(tumour_slide.nuclei_csv)
        dark = nuclei["kind"] == "lymphocyte"
        xs = (nuclei["x"][dark] / MPP).astype(int)[:200]
        ys = (nuclei["y"][dark] / MPP).astype(int)[:200]
        centres = np.array(
            [
                np.asarray(slide.read_region((x, y), 0, (1, 1)).convert("RGB"))[0, 0]
                for x, y in zip(xs, ys, strict=True)
            ]
        )
    finally:
        slide.close()
    # Level-1 pixels of mask cells well inside / outside tissue.
    from scipy import ndimage

    inner = ndimage.binary_erosion(tissue, iterations=2)
    outer = ~ndimage.binary_dilation(tissue, iterations=2)
    cell = d // 2
    tiss_px = level1[: tissue.shape[0] * cell, : tissue.shape[1] * cell]
    blocks = tiss_px.reshape(tissue.shape[0], cell, tissue.shape[1], cell, 3).mean(axis=(1, 3))
    background = blocks[outer]
    assert background.min() > 225  # near white
    tis = blocks[inner].mean(axis=0)
    r, g, b = tis
    assert r > g + 30 and b > g + 10 and tis.mean() < 215  # pink-purple, clearly stained
    # Nucleus centres are dark purple (blue > green, much darker than tissue).
    mean = centres.mean(axis=0)
    assert mean.mean() < 140 and mean[2] > mean[1] + 30 and mean[0] > mean[1]


def test_progress_events_and_return_value(tmp_path: Path) -> None:
    job = generate_synthetic_slide(tmp_path / "p.tif", 1024, seed=1, mpp=1.0)
    events = []
    while True:
        try:
            events.append(next(job))
        except StopIteration as stop:
            truth = stop.value
            break
    assert all(isinstance(e, Progress) for e in events)
    assert [e.done for e in events] == sorted(e.done for e in events)
    assert events[-1].done == events[-1].total > 0
    assert isinstance(truth, SyntheticTruth)
    assert truth.mpp == 1.0 and truth.mask_mpp == pytest.approx(16.0)
    assert (truth.width, truth.height) == (1024, 1024)
    assert set(truth_paths(truth.slide_path)) == {
        "slide_path", "truth_json", "tumour_geojson", "tissue_png", "tumour_png", "nuclei_csv",
    }  # fmt: skip
    for key, path in truth_paths(truth.slide_path).items():
        assert path == getattr(truth, key) and path.exists()


def test_determinism_same_seed_identical_different_seed_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = write_synthetic_slide(tmp_path / "a.tif", 2048, seed=11, pen_mark=True)
    # Independent of thread scheduling: one worker gives the same bytes as several.
    monkeypatch.setattr(synthetic.writer, "_n_workers", lambda: 1)
    b = write_synthetic_slide(tmp_path / "b.tif", 2048, seed=11, pen_mark=True)
    monkeypatch.undo()
    c = write_synthetic_slide(tmp_path / "c.tif", 2048, seed=12, pen_mark=True)
    assert tile_hashes(a.slide_path) == tile_hashes(b.slide_path)
    assert tile_hashes(a.slide_path) != tile_hashes(c.slide_path)
    for key in ("tumour_geojson", "nuclei_csv", "tissue_png", "tumour_png"):
        assert getattr(a, key).read_bytes() == getattr(b, key).read_bytes(), key
    ta, tb = load_truth(a.slide_path), load_truth(b.slide_path)
    ta.pop("files")
    tb.pop("files")
    assert ta == tb
    assert a.nuclei_csv.read_bytes() != c.nuclei_csv.read_bytes()


# ----------------------------------------------------------------------------- ground truth


def test_truth_json_contents(tumour_slide: SyntheticTruth) -> None:
    truth = load_truth(tumour_slide.slide_path)
    assert truth == load_truth(tumour_slide.truth_json)
    assert truth["label"] == "tumour" == tumour_slide.label
    assert truth["generator"] == GENERATOR
    assert (truth["width"], truth["height"], truth["seed"]) == (3072, 3072, 7)
    assert truth["mpp"] == MPP and truth["mask_mpp"] == tumour_slide.mask_mpp
    assert truth["tumour_area_um2"] == pytest.approx(tumour_slide.tumour_area_um2)
    assert truth["tumour_area_mm2"] == pytest.approx(truth["tumour_area_um2"] / 1e6)
    assert 0 < truth["tumour_area_mm2"] < truth["tissue_area_mm2"]
    # Tissue covers roughly 40-60% of the slide.
    slide_mm2 = 3072 * 3072 * MPP**2 / 1e6
    assert 0.35 < truth["tissue_area_mm2"] / slide_mm2 < 0.65
    assert truth["n_nuclei"] == tumour_slide.n_nuclei > truth["n_tumour_nuclei"] > 0
    assert truth["options"]["tumour_size"] == "macro" and truth["options"]["negative"] is False
    # The default tumour is type A, recorded at the top level and per lesion.
    assert truth["tumour_type"] == tumour_slide.tumour_type == "A"
    assert truth["lesions"] and {lesion["tumour_type"] for lesion in truth["lesions"]} == {"A"}


def test_polygons_masks_and_nuclei_agree(tumour_slide: SyntheticTruth) -> None:
    truth = load_truth(tumour_slide.slide_path)
    tumour = read_mask(tumour_slide.tumour_png)
    tissue = read_mask(tumour_slide.tissue_png)
    d = truth["mask_downsample"]
    assert tumour.shape == tissue.shape == (3072 // d, 3072 // d)
    assert tumour.any() and not (tumour & ~tissue).any()  # tumour inside tissue

    geojson = json.loads(tumour_slide.tumour_geojson.read_text())
    assert geojson["type"] == "FeatureCollection" and geojson["features"]
    for feature in geojson["features"]:
        assert feature["geometry"]["type"] == "Polygon"
        assert feature["properties"]["classification"]["name"] == "Tumor"
        assert feature["properties"]["objectType"] == "annotation"
    polygons = geojson_to_polygons(geojson)
    raster = rasterize_polygons(polygons, tumour.shape, scale=d)
    iou = (raster & tumour).sum() / (raster | tumour).sum()
    assert iou > 0.95

    nuclei = read_nuclei(tumour_slide.nuclei_csv)
    assert len(nuclei["x"]) == truth["n_nuclei"]
    is_tumour = nuclei["label"] == "tumour"
    assert set(nuclei["label"]) == {"tumour", "normal"}
    assert np.array_equal(is_tumour, nuclei["kind"] == "tumour")
    assert {"epithelial", "lymphocyte", "fibroblast"} <= set(nuclei["kind"])
    assert is_tumour.sum() == truth["n_tumour_nuclei"]
    inside = inside_polygons(polygons, nuclei["x"] / MPP, nuclei["y"] / MPP)
    assert inside[is_tumour].mean() > 0.99
    assert (~inside[~is_tumour]).mean() > 0.99
    # Nuclei lie on the slide and on tissue.
    assert nuclei["x"].min() >= 0 and nuclei["x"].max() < 3072 * MPP
    cols = (nuclei["x"] / (MPP * d)).astype(int)
    rows = (nuclei["y"] / (MPP * d)).astype(int)
    from scipy import ndimage

    assert ndimage.binary_dilation(tissue)[rows, cols].mean() > 0.99


def test_learnable_but_not_trivial(tumour_slide: SyntheticTruth) -> None:
    nuclei = read_nuclei(tumour_slide.nuclei_csv)
    is_tumour = nuclei["label"] == "tumour"
    r_t, r_n = nuclei["r"][is_tumour], nuclei["r"][~is_tumour]
    assert r_t.mean() > r_n.mean() + 1.0
    assert r_t.min() < np.percentile(r_n, 99.5)  # size distributions overlap a little

    # Darkness of 64 x 64 px level-0 patches (level 1, 32 px) fully inside tumour / normal tissue.
    truth = load_truth(tumour_slide.slide_path)
    tumour = read_mask(tumour_slide.tumour_png)
    tissue = read_mask(tumour_slide.tissue_png)
    slide = openslide.OpenSlide(tumour_slide.slide_path)
    try:
        grey = np.asarray(slide.read_region((0, 0), 1, slide.level_dimensions[1]).convert("L"), float)
    finally:
        slide.close()
    k = 4  # mask cells per patch
    cell = truth["mask_downsample"] // 2
    hp, wp = tumour.shape[0] // k, tumour.shape[1] // k

    def full(mask: np.ndarray) -> np.ndarray:
        return mask[: hp * k, : wp * k].reshape(hp, k, wp, k).all(axis=(1, 3))

    size = k * cell
    darkness = 255 - grey[: hp * size, : wp * size].reshape(hp, size, wp, size).mean(axis=(1, 3))
    dark_t = darkness[full(tumour)]
    dark_n = darkness[full(tissue & ~tumour)]
    assert len(dark_t) > 10 and len(dark_n) > 100
    assert dark_t.mean() > dark_n.mean() + 20
    # ... but some normal tissue (lymphoid aggregates) is darker than some tumour.
    assert (dark_n > np.percentile(dark_t, 10)).mean() > 0.01


def test_negative_slide_has_no_tumour(negative_slide: SyntheticTruth) -> None:
    truth = load_truth(negative_slide.slide_path)
    assert negative_slide.label == truth["label"] == "normal"
    assert (negative_slide.width, negative_slide.height) == (2560, 2048)
    assert truth["tumour_area_um2"] == 0.0 and truth["n_tumour_nuclei"] == 0
    assert json.loads(negative_slide.tumour_geojson.read_text()) == {
        "type": "FeatureCollection",
        "features": [],
    }
    assert not read_mask(negative_slide.tumour_png).any()
    assert read_mask(negative_slide.tissue_png).any()
    nuclei = read_nuclei(negative_slide.nuclei_csv)
    assert len(nuclei["x"]) > 100 and set(nuclei["label"]) == {"normal"}
    slide = openslide.OpenSlide(negative_slide.slide_path)
    try:
        assert slide.dimensions == (2560, 2048) and slide.level_count == 2
    finally:
        slide.close()


def test_micro_metastasis_is_small_but_present(
    micro_slide: SyntheticTruth, tumour_slide: SyntheticTruth
) -> None:
    truth = load_truth(micro_slide.slide_path)
    assert micro_slide.label == "tumour"
    assert truth["n_lesions"] == 1 and truth["n_tumour_nuclei"] > 20
    assert 0.005e6 < micro_slide.tumour_area_um2 < 0.3e6  # at most ~0.6 mm across
    assert read_mask(micro_slide.tumour_png).sum() < read_mask(micro_slide.tissue_png).sum() / 4


def test_artefacts_and_other_resolutions(tmp_path: Path) -> None:
    t = write_synthetic_slide(tmp_path / "art.tif", 1536, seed=2, mpp=0.25, pen_mark=True, blurred_patch=True)
    truth = load_truth(t.slide_path)
    assert set(truth["artefacts"]) == {"pen_mark", "blurred_patch"}
    assert truth["options"]["pen_mark"] and truth["options"]["blurred_patch"]
    slide = openslide.OpenSlide(t.slide_path)
    try:
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25, abs=1e-3)
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB")).astype(int)
    finally:
        slide.close()
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    ink = (g > r + 40) | (b > r + 60)  # green or blue marker, never H&E
    assert ink.mean() > 0.002
    assert t.mask_mpp == pytest.approx(4.0)


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tumour_size"):
        write_synthetic_slide(tmp_path / "x.tif", 1024, tumour_size="huge")
    with pytest.raises(ValueError, match="at least"):
        write_synthetic_slide(tmp_path / "x.tif", 100)
    with pytest.raises(ValueError, match="tile_size"):
        write_synthetic_slide(tmp_path / "x.tif", 1024, tile_size=100)
    assert not (tmp_path / "x.tif").exists()
