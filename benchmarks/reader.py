"""Reader benchmark: the dask pyramid against raw OpenSlide on the same tiles, same run.

Run (from the repository root, after the README's set-up)::

    xvfb-run -a python benchmarks/reader.py            # full table, napari screenshot rows included
    python benchmarks/reader.py --no-gui               # without the napari rows

Rows (each a ratio of the pyramid's rate to raw ``openslide.read_region`` on the
same regions, measured alternately, best of ``--rounds``):

- *single tiles*: N random level-0 tiles, one ``np.asarray(pyramid[0][tile])``
  each, against one ``read_region`` each. This is dask's worst case: a fixed
  cost of about 2 ms per compute.
- *viewer fields*: random 1024 x 1024 level-0 fields (what napari asks for when
  zoomed in), one compute each; dask decodes the field's tiles in parallel.
- *batched tiles*: the same N tiles in one dask compute against N raw reads.
- *open*: time to open a 100,000 x 100,000 slide and build its pyramid,
  against ``openslide.OpenSlide``.
- *first screenshot*: napari opens the 100k slide with this plugin and renders
  a frame, against the same for the smaller synthetic slide.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dask
import imagecodecs
import numpy as np
import openslide
import tifffile

from napari_pathology.demo import ensure_demo_slide
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import open_slide

OUT = Path(__file__).parent / "out"
TILE = 256


def best_of(rounds: int, function: Callable[[], object]) -> float:
    """Smallest wall time of ``rounds`` calls."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def random_tiles(width: int, height: int, count: int, size: int, seed: int) -> list[tuple[int, int]]:
    """Tile-aligned random positions of ``size`` x ``size`` regions inside the level."""
    rng = np.random.default_rng(seed)
    xs = rng.integers(0, (width - size) // TILE, count) * TILE
    ys = rng.integers(0, (height - size) // TILE, count) * TILE
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def raw_reads(path: Path, regions: list[tuple[int, int]], size: int) -> None:
    """Read regions with a fresh OpenSlide handle (its tile cache starts empty)."""
    slide = openslide.OpenSlide(str(path))
    for x, y in regions:
        np.asarray(slide.read_region((x, y), 0, (size, size)))
    slide.close()


def pyramid_reads(path: Path, regions: list[tuple[int, int]], size: int) -> None:
    """Read the same regions through a fresh dask pyramid, one compute each."""
    level0 = open_slide(path).pyramid()[0]
    for x, y in regions:
        np.asarray(level0[y : y + size, x : x + size])


def pyramid_batch(path: Path, regions: list[tuple[int, int]], size: int) -> None:
    """Read all regions in a single dask compute (threaded scheduler)."""
    level0 = open_slide(path).pyramid()[0]
    dask.compute(*[level0[y : y + size, x : x + size] for x, y in regions])


def write_big_slide(path: Path, source: Path, side: int = 100_000, coverage: int = 8) -> Path:
    """A ``side`` x ``side`` generic-tiff pyramid made from real tiles of ``source``.

    One tile in ``coverage`` holds tissue (JPEG tiles cut from the synthetic
    slide); the others are empty (zero byte count), which OpenSlide reads as
    transparent and the plugin shows white. Written once and reused.
    """
    if path.exists():
        return path
    slide = open_slide(source)
    width, height = slide.dimensions
    encoded = [
        imagecodecs.jpeg_encode(np.ascontiguousarray(slide.read_region(0, x, y, TILE, TILE)), level=85)
        for x, y in random_tiles(width, height, 64, TILE, seed=1)
    ]
    mpp = slide.mpp[0] if slide.mpp else 0.5

    def tiles(level_side: int):
        count = -(-level_side // TILE)
        for row in range(count):
            for col in range(count):
                inside = (row // 16 + col // 16) % coverage == 0
                yield encoded[(row * 7 + col) % len(encoded)] if inside else b""

    partial = path.with_suffix(".partial")
    with tifffile.TiffWriter(partial, bigtiff=True) as tif:
        level_side, first = side, True
        while True:
            tif.write(
                tiles(level_side), shape=(level_side, level_side, 3), dtype=np.uint8,
                tile=(TILE, TILE), photometric="rgb", compression="jpeg",
                resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
                subfiletype=0 if first else 1,
            )  # fmt: skip
            if level_side <= 1024:
                break
            level_side, first = -(-level_side // 2), False
    os.replace(partial, path)
    return path


def first_screenshot_seconds(path: Path) -> float:
    """Seconds from ``viewer.open`` to the first rendered frame of the slide."""
    import napari

    viewer = napari.Viewer(show=False)
    try:
        start = time.perf_counter()
        viewer.open(str(path), plugin="napari-pathology")
        viewer.reset_view()
        viewer.screenshot(canvas_only=True, flash=False)
        return time.perf_counter() - start
    finally:
        viewer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20_000, help="synthetic slide side (px)")
    parser.add_argument("--tiles", type=int, default=400, help="random level-0 tiles")
    parser.add_argument("--fields", type=int, default=40, help="random 1024 px viewer fields")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big", type=int, default=100_000, help="side of the large slide")
    parser.add_argument("--no-gui", action="store_true", help="skip the napari screenshot rows")
    args = parser.parse_args()

    OUT.mkdir(exist_ok=True)
    print(f"making/using a {args.size}px synthetic slide...", file=sys.stderr)
    path = run_to_completion(ensure_demo_slide(args.size, seed=1, folder=OUT))
    big = write_big_slide(OUT / f"big-{args.big}.tif", path, side=args.big)
    for file in (path, big):  # warm the OS page cache so both sides read from memory
        file.read_bytes()
    width, height = open_slide(path).dimensions
    tiles = random_tiles(width, height, args.tiles, TILE, seed=2)
    fields = random_tiles(width, height, args.fields, 1024, seed=3)

    rows: list[tuple[str, str, float, float, str]] = []

    def compare(name: str, unit: str, count: int, baseline: Callable, ours: Callable) -> None:
        raw_t, our_t = [], []
        for _ in range(args.rounds):  # alternate so drift hits both sides alike
            raw_t.append(best_of(1, baseline))
            our_t.append(best_of(1, ours))
        raw_rate, our_rate = count / min(raw_t), count / min(our_t)
        rows.append((name, unit, raw_rate, our_rate, f"{our_rate / raw_rate:.2f}"))

    compare("single tiles (256 px)", "tiles/s", len(tiles),
            lambda: raw_reads(path, tiles, TILE), lambda: pyramid_reads(path, tiles, TILE))  # fmt: skip
    compare("viewer fields (1024 px)", "fields/s", len(fields),
            lambda: raw_reads(path, fields, 1024), lambda: pyramid_reads(path, fields, 1024))  # fmt: skip
    compare("batched tiles, one compute", "tiles/s", len(tiles),
            lambda: raw_reads(path, tiles, TILE), lambda: pyramid_batch(path, tiles, TILE))  # fmt: skip

    raw_open = best_of(args.rounds, lambda: openslide.OpenSlide(str(big)))
    our_open = best_of(args.rounds, lambda: open_slide(big).pyramid())
    rows.append((f"open {args.big:,} px slide", "ms", raw_open * 1e3, our_open * 1e3,
                 f"{raw_open / our_open:.2f}"))  # fmt: skip

    if not args.no_gui:
        small_shot = min(first_screenshot_seconds(path) for _ in range(2))
        big_shot = min(first_screenshot_seconds(big) for _ in range(2))
        rows.append((f"first screenshot, {args.big:,} vs {args.size:,} px", "s", small_shot,
                     big_shot, f"{small_shot / big_shot:.2f}"))  # fmt: skip

    print(f"\nReader benchmark: {os.cpu_count()} CPU cores, {width:,} px synthetic slide, "
          f"{args.tiles} tiles, {args.fields} fields, best of {args.rounds}\n")  # fmt: skip
    print("| measure | unit | baseline | napari-pathology | ratio |")
    print("|---|---|---:|---:|---:|")
    for name, unit, base, ours, ratio in rows:
        print(f"| {name} | {unit} | {base:,.1f} | {ours:,.1f} | {ratio} |")
    print("\nratio: ours / baseline for rates, baseline / ours for times (higher is better);")
    print("baseline: raw openslide.read_region, openslide.OpenSlide, and the smaller slide's frame.")


if __name__ == "__main__":
    main()
