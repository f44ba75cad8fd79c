"""Backends and pyramids: pixel equality, laziness, um/px, broken files (no Qt)."""

from __future__ import annotations

import shutil

import numpy as np
import openslide
import pytest
import tifffile

from conftest import SLIDES, procedural_levels, real_file
from napari_pathology.slide import (
    InMemoryBackend,
    Slide,
    SlideOpenError,
    SlideReadError,
    UnsupportedFormatError,
    open_slide,
)
from napari_pathology.slide.backends import checked_mpp, rgba_to_rgb_on_white


def assert_pyramid_matches_openslide(path, regions) -> None:
    slide = open_slide(path)
    reference = openslide.OpenSlide(str(path))
    pyramid = slide.pyramid()
    for level, x, y, w, h in regions:
        level = min(level, slide.level_count - 1)
        level_w, level_h = slide.level_dimensions[level]
        x, y = min(x, level_w - 1), min(y, level_h - 1)
        w, h = min(w, level_w - x), min(h, level_h - y)
        ds = slide.level_downsamples[level]
        # OpenSlide shifts by a sub-pixel (interpolating) when location / downsample is not
        # whole, so read from the enclosing chunk origin there, as the pyramid does.
        cw, ch = pyramid[level].chunksize[1], pyramid[level].chunksize[0]
        ox, oy = (x, y) if ds == int(ds) else (x - x % cw, y - y % ch)
        expected = np.asarray(
            reference.read_region((round(ox * ds), round(oy * ds)), level, (w + x - ox, h + y - oy))
        )[y - oy :, x - ox :, :3]
        got = np.asarray(pyramid[level][y : y + h, x : x + w])
        np.testing.assert_array_equal(got, expected, err_msg=f"{path.name} level {level} {x},{y}")


REGIONS = [(0, 0, 0, 256, 256), (0, 300, 517, 700, 333), (1, 130, 77, 400, 300), (2, 5, 9, 64, 64)]


def test_pyramid_equals_openslide_on_synthetic(synthetic_slide) -> None:
    assert_pyramid_matches_openslide(synthetic_slide.slide_path, REGIONS)


@pytest.mark.parametrize("name", ["cmu_small_region.svs", "boxes.tiff", "small.svs", "boxes_0.dcm"])
def test_pyramid_equals_openslide_on_real_files(name: str) -> None:
    assert_pyramid_matches_openslide(real_file(f"slides/{name}"), REGIONS)


def test_pyramid_chunks_follow_tile_grid(synthetic_slide) -> None:
    slide = open_slide(synthetic_slide.slide_path)
    level0 = slide.pyramid()[0]
    assert level0.dtype == np.uint8 and level0.shape == (3072, 3072, 3)
    assert level0.chunksize == (256, 256, 3)
    cmu = open_slide(real_file("slides/cmu_small_region.svs"))
    assert cmu.backend.tile_sizes[0] == (240, 240)
    assert cmu.pyramid()[0].chunksize[:2] == (480, 480)  # two file tiles per chunk side


def test_opening_a_100k_slide_reads_nothing_and_a_view_reads_only_its_tiles() -> None:
    backend = InMemoryBackend(procedural_levels(100_000), mpp=0.25, tile_size=256)
    slide = Slide(backend)
    pyramid = slide.pyramid()
    assert pyramid[0].shape == (100_000, 100_000, 3)
    assert len(pyramid) == 8
    assert backend.read_count == 0
    np.asarray(pyramid[0][51_200:51_712, 25_600:26_112])  # 2 x 2 tiles, aligned
    assert backend.read_count == 4
    np.asarray(pyramid[3][100:400, 100:400])  # straddles 2 x 2 tiles
    assert backend.read_count == 8


def test_read_region_pads_outside_with_white() -> None:
    image = np.zeros((100, 120, 3), np.uint8)
    slide = Slide(InMemoryBackend([image], mpp=0.5))
    region = slide.read_region(0, 100, 90, 50, 30)
    assert region.shape == (30, 50, 3)
    assert (region[:10, :20] == 0).all()
    assert (region[10:] == 255).all() and (region[:, 20:] == 255).all()


def test_transparent_pixels_become_white() -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgba[0, 1] = (0, 0, 0, 0)
    rgba[1, 0] = (0, 0, 0, 128)
    out = rgba_to_rgb_on_white(rgba)
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert tuple(out[1, 0]) == (127, 127, 127)


def test_mpp_from_file_override_and_implausible_values(synthetic_slide) -> None:
    slide = open_slide(synthetic_slide.slide_path)
    assert slide.mpp == pytest.approx((0.5, 0.5), abs=1e-3)
    assert slide.mpp_source == "file"
    slide.set_mpp(0.25)
    assert slide.mpp == (0.25, 0.25) and slide.info().mpp_source == "user"
    slide.set_mpp(None)
    assert slide.mpp_source == "file"
    with pytest.raises(ValueError, match="positive"):
        slide.set_mpp(-1)
    assert checked_mpp(352.78, "TIFF resolution tags")[0] is None
    assert checked_mpp(0.2527, "x")[0] == 0.2527


def test_72_dpi_tiff_is_missing_mpp_and_require_mpp_says_how_to_fix() -> None:
    slide = open_slide(real_file("slides/boxes.tiff"))
    assert slide.mpp is None and slide.mpp_source == "missing"
    assert "352.8" in slide.info().mpp_note
    with pytest.raises(SlideOpenError, match="Slide panel"):
        slide.require_mpp()
    assert open_slide(real_file("slides/boxes.tiff"), mpp=0.5).require_mpp() == (0.5, 0.5)


def test_slide_info_facts_of_a_real_aperio_file() -> None:
    info = open_slide(real_file("slides/cmu_small_region.svs")).info()
    assert (info.vendor, info.width, info.height, info.levels) == ("aperio", 2220, 2967, 1)
    assert info.mpp_x == pytest.approx(0.499)
    assert info.objective_power == 20
    assert set(info.associated_images) == {"label", "macro", "thumbnail"}
    assert info.size_mm == pytest.approx((2220 * 0.499 / 1000, 2967 * 0.499 / 1000))


def test_associated_images_are_rgb() -> None:
    slide = open_slide(real_file("slides/cmu_small_region.svs"))
    label = slide.read_associated_image("label")
    assert label.dtype == np.uint8 and label.ndim == 3 and label.shape[2] == 3
    with pytest.raises(KeyError):
        slide.read_associated_image("nonexistent")


@pytest.mark.parametrize(
    ("name", "error", "cause"),
    [
        ("unopenable.tiff", SlideOpenError, "compression"),
        ("broken.svs", SlideOpenError, "corrupt"),
        ("unreadable.svs", SlideReadError, "Bogus marker"),
    ],
)
def test_broken_files_give_clear_errors_naming_the_file(name, error, cause) -> None:
    path = real_file(f"slides/{name}")
    with pytest.raises(error, match=cause) as info:
        open_slide(path).validate()
    assert name in str(info.value)


def test_truncated_copy_of_a_good_file_is_a_clear_error(tmp_path) -> None:
    source = real_file("slides/cmu_small_region.svs")
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(SlideOpenError) as info:
        slide = open_slide(truncated)
        slide.validate()
        np.asarray(slide.pyramid()[0])
    assert "truncated.svs" in str(info.value)


def test_truncated_synthetic_tiff_is_a_clear_error(tmp_path, synthetic_slide) -> None:
    data = synthetic_slide.slide_path.read_bytes()
    truncated = tmp_path / "cut.tif"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SlideOpenError, match=r"cut\.tif"):
        slide = open_slide(truncated)
        slide.validate()
        np.asarray(slide.pyramid()[0])


def test_unknown_and_missing_files(tmp_path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(UnsupportedFormatError, match="unsupported file type"):
        open_slide(other)
    with pytest.raises(SlideOpenError, match="no such file"):
        open_slide(tmp_path / "missing.svs")
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    with pytest.raises(SlideOpenError, match=r"fake\.png"):
        open_slide(fake)


def test_pyramid_with_error_callback_shows_grey_instead_of_raising() -> None:
    path = real_file("slides/unreadable.svs")
    slide = open_slide(path)
    errors: list[Exception] = []
    tile = np.asarray(slide.pyramid(on_error=errors.append)[0])
    assert (tile == 190).all() and len(errors) == 1
    with pytest.raises(SlideReadError):
        np.asarray(open_slide(path).pyramid()[0])


def test_ome_tiff_pyramid_through_tifffile(tmp_path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (700, 900, 3), dtype=np.uint8)
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        options = dict(tile=(256, 256), photometric="rgb", compression="zlib")
        tif.write(image, subifds=2, metadata={"PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25},
                  **options)  # fmt: skip
        tif.write(image[::2, ::2], subfiletype=1, **options)
        tif.write(image[::4, ::4], subfiletype=1, **options)
    slide = open_slide(path)
    assert slide.backend.name == "tifffile" and slide.info().vendor == "ome-tiff"
    assert slide.level_count == 3
    assert slide.mpp == pytest.approx((0.25, 0.25))
    pyramid = slide.pyramid()
    np.testing.assert_array_equal(np.asarray(pyramid[0][100:400, 50:600]), image[100:400, 50:600])
    np.testing.assert_array_equal(np.asarray(pyramid[1]), image[::2, ::2])
    assert slide.level_downsamples[2] == pytest.approx(900 / 225)


def test_plain_png_is_a_single_level_read_on_demand(tmp_path) -> None:
    from PIL import Image

    rgba = np.zeros((50, 60, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:25, ..., 3] = 255
    path = tmp_path / "tile.png"
    Image.fromarray(rgba).save(path)
    slide = open_slide(path)
    assert slide.backend.name == "image" and slide.level_count == 1 and slide.mpp is None
    pixels = np.asarray(slide.pyramid()[0])
    assert tuple(pixels[0, 0]) == (200, 0, 0)
    assert tuple(pixels[40, 0]) == (255, 255, 255)  # transparent -> white


def test_real_png_tile_matches_pillow() -> None:
    from PIL import Image

    path = real_file("tiles/almost-white-1.png")
    expected = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(open_slide(path).pyramid()[0]), expected)


def test_slides_folder_fixture_path_is_where_ci_puts_it() -> None:
    # Documents the layout CI relies on: the shared data sits beside the clone.
    if not SLIDES.exists():
        pytest.skip("../shared/data not present")
    assert (SLIDES / "cmu_small_region.svs").exists()


def test_copy_of_real_file_keeps_facts(tmp_path) -> None:
    source = real_file("slides/cmu_small_region.svs")
    copy = tmp_path / "copy.svs"
    shutil.copy(source, copy)
    assert open_slide(copy).info().width == open_slide(source).info().width
