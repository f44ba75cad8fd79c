"""Hostile and broken slide inputs: nothing hangs, nothing grows without bound, nothing is silently wrong.

Issue 11, slide and image inputs: FIFOs and devices, huge claimed sizes,
truncated TIFFs, oversize images, fluorescence slides, full disks and bad
tissue GeoJSON. Every file here is small and generated.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import real_file
from napari_pathology.fileio import OutputError
from napari_pathology.slide import (
    InMemoryBackend,
    NotBrightfieldError,
    RegionTooLargeError,
    Slide,
    SlideOpenError,
    UnsupportedFormatError,
    open_slide,
)
from napari_pathology.slide.pyramid import TOP_LEVEL_SIDE, downsample_mean
from napari_pathology.tissue import (
    TissueParams,
    detect_tissue,
    read_tissue_file,
    tissue_mask_from_geojson,
    write_tissue_outputs,
)

PINK = (200, 120, 180)


def _in_thread(fn, timeout: float = 20.0):
    """Run ``fn`` in a daemon thread; fail (not hang) when it does not return in time."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"still running after {timeout} s: it blocked")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


def _release_fifo(path: Path) -> None:
    """Unblock a reader stuck on ``path`` (a FIFO) so a failed test leaves no thread behind."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    os.close(fd)


def _sparse_tiff(path: Path, height: int, width: int, filled: tuple[int, ...] = (0,)) -> Path:
    """A tiled zlib TIFF claiming ``height`` x ``width`` px whose tiles are all empty but ``filled``."""
    n = -(-height // 256) * -(-width // 256)
    tile = np.full((256, 256, 3), PINK, np.uint8)
    wanted = {i % n for i in filled}

    def tiles():
        for i in range(n):
            yield tile if i in wanted else None

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(256, 256),
                 photometric="rgb", compression="zlib")  # fmt: skip
    return path


def _pyramid_tiff(path: Path, side: int = 1024) -> Path:
    """A small 3-level tiled JPEG pyramid (levels as reduced pages, like the synthetic writer)."""
    rng = np.random.default_rng(0)
    base = np.full((side, side, 3), 235, np.uint8)
    base[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = PINK
    base = np.clip(base.astype(int) + rng.integers(-10, 10, base.shape), 0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path) as tw:
        level = base
        for k in range(3):
            extra = {"subfiletype": 1} if k else {}
            tw.write(level, tile=(256, 256), compression="jpeg", photometric="rgb", **extra)
            level = downsample_mean(level, 2)
    return path


# --------------------------------------------------------------------------- 1. FIFOs, devices, folders


def test_fifo_with_a_slide_ending_is_refused_without_blocking(tmp_path) -> None:
    for name in ("fifo.svs", "fifo.tif", "fifo.ndpi", "fifo.png"):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        try:
            with pytest.raises(UnsupportedFormatError, match=rf"{name}.*not a regular file"):
                _in_thread(lambda fifo=fifo: open_slide(fifo), timeout=10)
        finally:
            _release_fifo(fifo)


def test_devices_and_folders_with_slide_endings_are_refused(tmp_path) -> None:
    device = tmp_path / "zero.tif"
    device.symlink_to("/dev/zero")  # reading it never ends
    with pytest.raises(UnsupportedFormatError, match="not a regular file"):
        _in_thread(lambda: open_slide(device), timeout=10)
    folder = tmp_path / "folder.svs"
    folder.mkdir()
    with pytest.raises(UnsupportedFormatError, match="folder"):
        open_slide(folder)
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(SlideOpenError, match="empty"):
        open_slide(empty)


def test_fifo_given_as_a_tissue_mask_is_refused_without_blocking(tmp_path) -> None:
    for name in ("mask.geojson", "mask.png"):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        try:
            with pytest.raises(ValueError, match="not a regular file"):
                _in_thread(lambda fifo=fifo: read_tissue_file(fifo, (1000, 1000), 0.5), timeout=10)
        finally:
            _release_fifo(fifo)
    meta = tmp_path / "saved.json"  # a saved mask whose JSON names a FIFO as its image
    facts = {"mpp": 8, "slide_size": [100, 100], "slide_mpp": [0.5, 0.5], "png": "mask.png"}
    meta.write_text(json.dumps(facts))
    with pytest.raises(ValueError, match=r"mask\.png is not a regular file"):
        _in_thread(lambda: read_tissue_file(meta, (100, 100), 0.5), timeout=10)


# --------------------------------------------------------------------------- 2. huge claimed sizes


def test_a_small_file_claiming_a_huge_single_level_is_refused_at_once(tmp_path) -> None:
    path = _sparse_tiff(tmp_path / "huge.tif", 200_000, 200_000)
    assert path.stat().st_size < 16 * 2**20
    start = time.monotonic()
    with pytest.raises(SlideOpenError, match=r"huge\.tif.*200000x200000.*pyramid"):
        _in_thread(lambda: open_slide(path), timeout=30)
    assert time.monotonic() - start < 20


def test_a_tall_single_level_gets_a_small_top_level_computed_in_bounded_memory(tmp_path) -> None:
    path = _sparse_tiff(tmp_path / "tall.tif", 100_000, 256, filled=(0, 200, -1))
    slide = open_slide(path)
    slide.validate()
    pyramid = slide.pyramid()
    assert pyramid[0].shape == (100_000, 256, 3)
    top = pyramid[-1]
    assert max(top.shape[:2]) <= TOP_LEVEL_SIDE
    assert all(max(c) <= 2048 for c in top.chunks[:2])
    tracemalloc.start()
    try:
        pixels = _in_thread(lambda: top.compute(scheduler="synchronous"), timeout=60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"computing the top level took {peak / 2**20:.0f} MiB"
    assert pixels.shape == top.shape and pixels.dtype == np.uint8
    # the first tile (256 x 256 of pink) is 256/f rows of the top level; the rest is white
    factor = round(100_000 / top.shape[0])
    assert (pixels[: 256 // factor - 1] == PINK).all()
    assert (pixels[256 // factor + 1 : 200 * 256 // factor - 1] == 255).all()  # empty tiles are white
    assert (pixels[200 * 256 // factor + 1 : 201 * 256 // factor - 1] == PINK).all()
    slide.close()


def test_computed_levels_are_area_averages_of_the_file_level() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (2500, 4500, 3), dtype=np.uint8)
    slide = Slide(InMemoryBackend([image], mpp=0.5))
    pyramid = slide.pyramid()
    assert [a.shape[:2] for a in pyramid] == [(2500, 4500), (1250, 2250), (625, 1125)]
    np.testing.assert_array_equal(pyramid[1].compute(), downsample_mean(image, 2))
    np.testing.assert_array_equal(pyramid[2].compute(), downsample_mean(image, 4))
    block = image[:4, :4].reshape(-1, 3).astype(float).mean(axis=0)
    np.testing.assert_allclose(pyramid[2][0, 0].compute(), np.round(block), atol=1)


def test_whole_level_reads_have_a_size_limit(tmp_path) -> None:
    slide = open_slide(_sparse_tiff(tmp_path / "wide.tif", 256, 1_200_000))
    start = time.monotonic()
    with pytest.raises(RegionTooLargeError, match=r"wide\.tif.*refused"):
        slide.read_region(0, 0, 0, 1_200_000, 256)
    assert time.monotonic() - start < 2


# --------------------------------------------------------------------------- 3. truncated TIFFs


def test_truncated_tiff_with_level_zero_intact_says_which_levels_are_missing(tmp_path, capfd) -> None:
    whole = _pyramid_tiff(tmp_path / "whole.tif")
    with tifffile.TiffFile(whole) as tif:
        level1 = tif.pages[1]
        cut = int(level1.dataoffsets[len(level1.dataoffsets) // 2]) + 10
    cut_path = tmp_path / "cut.tif"
    cut_path.write_bytes(whole.read_bytes()[:cut])
    slide = open_slide(cut_path)
    slide.validate()
    assert slide.level_count == 1
    info = slide.info()
    assert any("level(s) 1 (512x512)" in w and "cut.tif" in w for w in info.warnings), info.warnings
    assert any("missing" in w for w in info.warnings)
    assert info.as_dict()["warnings"] == list(info.warnings)
    top = slide.pyramid()[-1].compute()  # still a complete pyramid for the viewer
    assert top.shape[0] <= TOP_LEVEL_SIDE
    slide.close()
    err = capfd.readouterr().err
    assert "Task exception" not in err and "invalid page offset" not in err, err


def test_truncated_tiff_with_level_zero_cut_is_refused_with_one_clear_line(tmp_path, capfd) -> None:
    whole = _pyramid_tiff(tmp_path / "whole.tif")
    with tifffile.TiffFile(whole) as tif:
        level0 = tif.pages[0]
        cut = int(level0.dataoffsets[len(level0.dataoffsets) // 2])
    cut_path = tmp_path / "cut0.tif"
    cut_path.write_bytes(whole.read_bytes()[:cut])
    with pytest.raises(SlideOpenError, match=r"cut0\.tif.*truncated.*full-resolution level") as caught:
        open_slide(cut_path)
    assert "\n" not in str(caught.value)
    err = capfd.readouterr().err
    assert "Task exception" not in err and "Traceback" not in err, err


def test_an_undecodable_lower_level_is_dropped_by_validate_with_a_warning(tmp_path) -> None:
    path = _pyramid_tiff(tmp_path / "bad.tif")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[1]
        offset, count = int(page.dataoffsets[0]), int(page.databytecounts[0])
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\x00" * count  # the tile is there but is not JPEG
    path.write_bytes(bytes(data))
    slide = open_slide(path)
    assert slide.level_count == 3
    slide.validate()
    assert slide.level_count == 2 and slide.level_dimensions[1] == (256, 256)
    assert any("level(s) 1 (512x512) cannot be decoded" in w for w in slide.info().warnings)
    assert slide.pyramid()[-1].shape == (256, 256, 3)
    slide.close()


def test_tiff_reads_are_synchronous_and_match_the_decoded_file(tmp_path) -> None:
    path = _pyramid_tiff(tmp_path / "p.tif")
    expected = tifffile.imread(path, level=0)  # whole decode by tifffile
    from napari_pathology.slide import TiffBackend

    backend = TiffBackend(path)
    np.testing.assert_array_equal(backend.read_region(0, 100, 37, 400, 300), expected[37:337, 100:500])
    corner = backend.read_region(0, 1000, 1000, 50, 50)  # partly outside: white there
    np.testing.assert_array_equal(corner[:24, :24], expected[1000:, 1000:])
    assert (corner[24:] == 255).all()
    assert not backend._arrays  # no zarr store (and its asyncio tasks) was needed
    backend.close()


def test_planar_rgb_tiff_is_read_in_colour(tmp_path) -> None:
    from napari_pathology.slide import TiffBackend

    planes = np.random.default_rng(1).integers(0, 256, (3, 300, 200), dtype=np.uint8)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, planes, photometric="rgb", planarconfig="separate", tile=(64, 64))
    backend = TiffBackend(path)
    region = backend.read_region(0, 10, 20, 100, 50)
    np.testing.assert_array_equal(region, np.moveaxis(planes, 0, -1)[20:70, 10:110])
    backend.close()


def test_truncated_real_svs_is_refused(tmp_path) -> None:
    source = real_file("slides/cmu_small_region.svs")
    cut = tmp_path / "cut.svs"
    data = source.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SlideOpenError, match=r"cut\.svs"):
        slide = open_slide(cut)
        slide.validate()


# --------------------------------------------------------------------------- 4. oversize images


def _one_bit_png(path: Path, width: int, height: int) -> Path:
    """A 1-bit gray PNG of ``width`` x ``height`` (zeros but one square), streamed so it stays tiny."""
    row_bytes = (width + 7) // 8
    compressor = zlib.compressobj(9)
    chunks = []
    blank = b"\x00" * (row_bytes + 1)
    marked = b"\x00" + b"\xff" * (row_bytes // 4) + b"\x00" * (row_bytes - row_bytes // 4)
    for r in range(height):
        chunks.append(compressor.compress(marked if r < height // 4 else blank))
    chunks.append(compressor.flush())
    data = b"".join(chunks)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    path.write_bytes(png + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_a_huge_one_bit_png_mask_is_refused_in_one_line(tmp_path) -> None:
    png = _one_bit_png(tmp_path / "mask.png", 20_000, 20_000)
    assert png.stat().st_size < 2**20
    with pytest.raises(ValueError, match=r"mask\.png is 20000 x 20000 px") as caught:
        read_tissue_file(png, (40_000, 40_000), 0.5)
    assert "\n" not in str(caught.value) and "DecompressionBomb" not in type(caught.value).__name__


def test_a_large_mask_is_read_past_pils_limit_and_averaged_down(tmp_path, monkeypatch) -> None:
    import PIL.Image

    import napari_pathology.tissue as tissue

    png = _one_bit_png(tmp_path / "mask.png", 512, 512)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # PIL would call it a bomb
    monkeypatch.setattr(tissue, "MAX_MASK_SIDE", 128)
    mask = read_tissue_file(png, (1024, 1024), 0.5)
    assert mask.shape == (128, 128)
    assert mask.mask[:32, :32].all() and not mask.mask[40:].any()
    assert abs(mask.area_mm2 - 0.25 * 0.25 * (1024 * 0.5 / 1000) ** 2) < 1e-3
    assert PIL.Image.MAX_IMAGE_PIXELS == 1000  # restored


def test_a_huge_png_slide_is_refused_in_one_line(tmp_path) -> None:
    png = _one_bit_png(tmp_path / "slide.png", 20_000, 20_000)
    with pytest.raises(SlideOpenError, match=r"slide\.png is 20000 x 20000 px"):
        open_slide(png)


# --------------------------------------------------------------------------- 5. fluorescence slides


def _dark_field(size: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(5)
    image = np.clip(rng.normal(8, 4, (size, size, 3)), 0, 255).astype(np.uint8)
    for y, x in rng.integers(20, size - 20, (300, 2)):
        image[y - 4 : y + 4, x - 4 : x + 4] = (20, 60, 230)  # DAPI nuclei
    return image


def test_a_dark_field_slide_is_not_brightfield_and_is_refused_for_h_and_e(tmp_path) -> None:
    slide = Slide(InMemoryBackend([_dark_field()], mpp=1.0, path=str(tmp_path / "dapi.ndpi")))
    assert slide.brightfield is False
    assert slide.info().brightfield is False and slide.info().as_dict()["brightfield"] is False
    with pytest.raises(NotBrightfieldError, match=r"dapi\.ndpi looks like a fluorescence.*do not apply"):
        slide.require_brightfield()
    with pytest.raises(NotBrightfieldError):
        next(detect_tissue(slide, TissueParams()))


def test_run_analysis_refuses_a_dark_field_slide_first() -> None:
    from napari_pathology.analysis.engine import run_analysis

    slide = Slide(InMemoryBackend([_dark_field()], mpp=1.0))
    with pytest.raises(NotBrightfieldError, match="fluorescence"):
        next(run_analysis(slide, model=None))


def test_brightfield_slides_stay_brightfield(synthetic_slide) -> None:
    he = np.full((800, 800, 3), 240, np.uint8)
    he[200:600, 200:600] = PINK
    he[300:320, 300:320] = (60, 40, 120)  # dense hematoxylin
    assert Slide(InMemoryBackend([he], mpp=1.0)).brightfield is True
    black = Slide(InMemoryBackend([np.zeros((256, 256, 3), np.uint8)]))
    assert black.brightfield is None  # no signal at all: not called fluorescence
    black.require_brightfield()
    with open_slide(synthetic_slide.slide_path) as slide:
        assert slide.brightfield is True
        slide.require_brightfield()


@pytest.mark.parametrize("name", ["cmu_small_region.svs", "small.svs", "boxes.tiff"])
def test_real_brightfield_slides_are_brightfield(name) -> None:
    with open_slide(real_file(f"slides/{name}")) as slide:
        assert slide.brightfield is not False
        if name == "cmu_small_region.svs":
            assert slide.brightfield is True


# --------------------------------------------------------------------------- 6. atomic outputs


def _he_tiff(path: Path) -> Path:
    image = np.full((1024, 1024, 3), 240, np.uint8)
    image[256:768, 256:768] = PINK
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="zlib",
                     resolution=(1e4, 1e4), resolutionunit="CENTIMETER")  # fmt: skip
    return path


def test_tissue_outputs_on_a_full_disk_leave_no_torn_file(tmp_path, monkeypatch) -> None:
    from napari_pathology.progress import run_to_completion

    slide = _he_tiff(tmp_path / "he.tif")
    out = tmp_path / "out"
    out.mkdir()
    old = {name: f"old {name}" for name in ("tissue.png", "tissue.json", "tissue.geojson")}
    for name, text in old.items():
        (out / name).write_text(text)
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        if "geojson" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OutputError, match=r"cannot write to .*out: the disk is full") as caught:
        run_to_completion(write_tissue_outputs(slide, out, TissueParams(min_tissue_area_mm2=0.0)))
    assert "\n" not in str(caught.value)
    assert (out / "tissue.geojson").read_text() == old["tissue.geojson"]
    assert (out / "tissue.json").read_text() == old["tissue.json"]  # the JSON is written last
    assert sorted(p.name for p in out.iterdir()) == sorted(old)  # no temporary left behind
    monkeypatch.setattr(os, "fsync", real_fsync)
    paths = run_to_completion(write_tissue_outputs(slide, out, TissueParams(min_tissue_area_mm2=0.0)))
    assert json.loads(paths["geojson"].read_text())["features"]


def test_tissue_outputs_check_the_folder_before_the_work(tmp_path) -> None:
    from napari_pathology.progress import run_to_completion

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not a folder"):  # before the (missing) slide is opened
        run_to_completion(write_tissue_outputs(tmp_path / "missing.tif", blocker))


def test_synth_never_leaves_a_torn_slide_or_removes_an_old_one(tmp_path, monkeypatch) -> None:
    import napari_pathology.slide.synthetic as synthetic

    target = tmp_path / "s.tif"
    target.write_bytes(b"the user's old slide")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synthetic.writer, "_write_truth", full_disk)
    with pytest.raises(OutputError, match="disk is full"):
        synthetic.write_synthetic_slide(target, size=256, seed=1)
    assert target.read_bytes() == b"the user's old slide"
    assert [p.name for p in tmp_path.iterdir()] == ["s.tif"]
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        synthetic.write_synthetic_slide(blocker / "s.tif", size=256, seed=1)


# --------------------------------------------------------------------------- 7. tissue GeoJSON


def _feature(coords, name: str | None = None) -> dict:
    props = {"name": name} if name else {}
    return {"type": "Feature", "properties": props, "geometry": {"type": "Polygon", "coordinates": [coords]}}


def _collection(*features) -> dict:
    return {"type": "FeatureCollection", "features": list(features)}


def test_tissue_geojson_with_bad_coordinates_is_refused_naming_the_feature(tmp_path) -> None:
    good = _feature([[10, 10], [500, 10], [500, 500], [10, 500], [10, 10]])
    path = tmp_path / "t.geojson"
    path.write_text(json.dumps(_collection(good)).replace("500, 500", "NaN, NaN"))
    with pytest.raises(ValueError, match=r"t\.geojson.*NaN"):
        read_tissue_file(path, (1000, 1000), 0.5)
    path.write_text(json.dumps(_collection(good)).replace("500, 500", "1e400, 5"))  # parses as inf
    with pytest.raises(ValueError, match=r"t\.geojson: feature 0"):
        read_tissue_file(path, (1000, 1000), 0.5)
    outside = _feature([[5000, 5000], [6000, 5000], [6000, 6000], [5000, 5000]])
    path.write_text(json.dumps(_collection(good, outside)))
    with pytest.raises(ValueError, match=r"t\.geojson: feature 1"):
        read_tissue_file(path, (1000, 1000), 0.5)
    with pytest.raises(ValueError, match="feature 1"):
        tissue_mask_from_geojson(_collection(good, outside), (1000, 1000), 0.5)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"t\.geojson"):
        read_tissue_file(path, (1000, 1000), 0.5)
    path.write_text(json.dumps(_collection(good)))
    mask = read_tissue_file(path, (1000, 1000), 0.5)
    assert mask.mask.any()


# --------------------------------------------------------------------------- numbers that become sizes


def test_implausible_um_per_px_is_refused_by_name() -> None:
    slide = Slide(InMemoryBackend([np.full((64, 64, 3), 240, np.uint8)], mpp=0.5, path="/x/a.svs"))
    for bad in (1e-6, 1e9):
        with pytest.raises(ValueError, match=r"a\.svs must be between 0\.01 and 50"):
            slide.set_mpp(bad)
    slide.set_mpp(0.25)
    assert slide.mpp == (0.25, 0.25)


def test_a_tile_grid_too_fine_for_the_slide_is_refused_not_allocated() -> None:
    from conftest import procedural_levels
    from napari_pathology.tiles import make_tile_grid

    slide = Slide(InMemoryBackend(procedural_levels(100_000), mpp=0.25))
    start = time.monotonic()
    with pytest.raises(ValueError, match="larger stride"):
        make_tile_grid(slide, 0.25, 224, stride=1)
    assert time.monotonic() - start < 2
