"""The whole-slide CNN's input: tissue box, region-by-region read, disk cache, uint8 augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_pathology.cohort import read_slide_table
from napari_pathology.families.wholeslide.inputs import (
    SlideImages,
    SlideInputError,
    as_tensor,
    augment,
    locate_slide,
)
from napari_pathology.progress import run_to_completion
from napari_pathology.slide.slide import open_slide
from napari_pathology.tissue import read_at_mpp


@pytest.fixture(scope="module")
def slide(tiny_cohort: Path) -> Path:
    return read_slide_table(tiny_cohort)[2].path


def test_the_tissue_box_and_its_pixels(slide: Path) -> None:
    whole = locate_slide(slide, 8.0, crop_to_tissue=False)
    assert whole.box == (0, 256, 0, 256)  # 4096 px at 0.5 um/px
    box = locate_slide(slide, 8.0)
    r0, r1, c0, c1 = box.box
    assert r0 % 32 == 0 and c0 % 32 == 0  # on the network's output grid
    assert 0 <= r0 < r1 <= 256 and 0 <= c0 < c1 <= 256
    with open_slide(slide) as opened:
        full = run_to_completion(read_at_mpp(opened, 8.0))
    image = SlideImages().image(box)
    np.testing.assert_array_equal(image, full[r0:r1, c0:c1])
    outside = np.ones(full.shape[:2], bool)
    outside[r0:r1, c0:c1] = False
    assert full[outside].mean() > 200  # what the crop leaves out is glass, not tissue


def test_fixed_size_pads_centred_and_crops_centred(slide: Path) -> None:
    box = locate_slide(slide, 8.0)
    image = SlideImages().image(box)
    h, w = image.shape[:2]
    padded = SlideImages(size=320).image(box)
    top, left = (320 - h) // 2, (320 - w) // 2
    np.testing.assert_array_equal(padded[top : top + h, left : left + w], image)
    assert (padded[:top] == 255).all() and (padded[top + h :] == 255).all()
    cropped = SlideImages(size=128).image(box)
    np.testing.assert_array_equal(cropped, image[(h - 128) // 2 :][:128, (w - 128) // 2 :][:, :128])


def test_the_cache_reads_once_then_maps_the_file(slide: Path, tmp_path: Path) -> None:
    box = locate_slide(slide, 8.0)
    images = SlideImages(None, tmp_path / "cache", 2**30)
    first = images.image(box)
    (file,) = (tmp_path / "cache").glob("*.npy")
    second = images.image(box)
    assert (images.pyramid_reads, images.cache_reads) == (1, 1)
    np.testing.assert_array_equal(first, second)
    second[0, 0] = 7  # copy-on-write: the cached file is never changed by a caller
    np.testing.assert_array_equal(np.load(file), first)
    expected = np.array(first)
    del first, second  # (truncating a file still mapped would be a bus error, as in any program)
    damaged = tmp_path / "damaged"
    damaged.write_bytes(b"not an array")
    damaged.replace(file)  # a damaged cache file is read again from the slide
    np.testing.assert_array_equal(images.image(box), expected)
    assert images.pyramid_reads == 2
    small = SlideImages(None, tmp_path / "small", 100)  # over its limit: read every time, nothing written
    np.testing.assert_array_equal(small.image(box), expected)
    small.image(box)
    assert small.pyramid_reads == 2 and not list((tmp_path / "small").glob("*.npy"))


def test_bad_slides_are_named(tmp_path: Path) -> None:
    from PIL import Image

    plain = tmp_path / "plain.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(plain)
    with pytest.raises(SlideInputError, match="um/px"):
        locate_slide(plain, 8.0)
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"II*\x00garbage")
    with pytest.raises(SlideInputError, match=r"broken\.svs"):
        locate_slide(broken, 8.0)


def test_blank_slide_has_no_tissue(tmp_path: Path) -> None:
    import tifffile

    path = tmp_path / "glass.tif"
    tifffile.imwrite(
        path, np.full((512, 512, 3), 240, np.uint8), tile=(256, 256), resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER", photometric="rgb",
    )  # fmt: skip
    with pytest.raises(SlideInputError, match="no tissue found"):
        locate_slide(path, 8.0)
    assert locate_slide(path, 8.0, crop_to_tissue=False).shape == (32, 32)


def test_augment_on_uint8_equals_the_float_formula() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    same = augment(image, np.random.default_rng(0), rotations=False, flips=False, colour=0.0)
    np.testing.assert_array_equal(same, image)
    jittered = augment(image, np.random.default_rng(0), rotations=False, flips=False, colour=0.2)
    draw = np.random.default_rng(0)
    contrast, brightness = 1.0 + draw.uniform(-0.2, 0.2), draw.uniform(-0.2, 0.2)
    expected = np.clip(((image / 255.0 - 0.5) * contrast + 0.5 + brightness) * 255.0, 0, 255)
    assert np.abs(jittered - expected).max() <= 0.5 + 1e-6
    turned = [
        augment(image, np.random.default_rng(s), rotations=True, flips=True, colour=0.0) for s in range(12)
    ]
    assert {t.shape for t in turned} == {(40, 30, 3), (30, 40, 3)}
    assert all(sorted(t.ravel().tolist()) == sorted(image.ravel().tolist()) for t in turned)


def test_prepare_normalises_a_uint8_crop() -> None:
    from napari_pathology.tiles.tensors import normalize_uint8, normalize_unit

    image = np.random.default_rng(0).integers(0, 256, (16, 12, 3), dtype=np.uint8)
    x = as_tensor(image)
    assert x.shape == (1, 3, 16, 12) and x.dtype == torch.uint8
    expected = normalize_unit(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0, "imagenet")
    torch.testing.assert_close(normalize_uint8(x, "imagenet"), expected)
