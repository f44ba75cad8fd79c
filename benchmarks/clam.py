"""CLAM benchmark: the plugin's feature pipeline against CLAM's extractor, and heatmap memory.

Run (from the repository root, after the README's set-up)::

    python benchmarks/clam.py                       # 8192 px slide, torchvision:resnet18 (untrained)
    python benchmarks/clam.py --size 16384 --rounds 2

Rows:

- *features per slide*: every tissue patch of the same synthetic slide (same
  patches, same encoder network, same torch threads) through
  :func:`napari_pathology.features.extract_features` (threaded
  ``TileLoader`` reads, batched, written to a fresh zarr cache each round)
  and through a CLAM-style baseline: CLAM's ``extract_features_fp.py`` with
  its ``Whole_Slide_Bag_FP`` dataset, one ``openslide.OpenSlide.read_region``
  per patch, ``ToTensor`` + ``Normalize`` per patch, a PyTorch ``DataLoader``
  with CLAM's defaults (batch 256; ``num_workers`` 8 on CUDA, the default 0 on
  CPU). Patches/s, best of ``--rounds``, sides alternated. A second row
  runs both pipelines with a trivial network (per-channel means): what
  reading and normalising the patches costs, the share the plugin's
  threaded, batched reads change (on a few CPU cores the CNN dominates).
- *attention heatmap memory on a 100,000 px slide*: the arrays the bag
  runner allocates for the heatmap (a float32 grid, one cell per patch, the
  per-class grids of a 3-class model, the per-patch cells, raw attention and
  weights), measured with ``tracemalloc`` on the real 100,000 px grid with
  every cell tissue (the worst case); against CLAM's ``drawHeatmap``, which
  allocates a full-resolution ``float64`` overlay (via an ``int64`` array)
  and a ``uint16`` counter of the region drawn: measured on a
  ``--clam-side`` px region and extrapolated per pixel, and computed
  analytically (a full-resolution float32 array alone is 40 GB).
  The ``(N, D)`` features are in memory on both sides alike and not counted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
import torch

from napari_pathology.analysis.jobs import tissue_or_detect
from napari_pathology.features import Encoder, extract_features, feature_grid, get_encoder, level0_coords
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import open_slide
from napari_pathology.slide.synthetic import write_synthetic_slide

OUT = Path(__file__).parent / "out"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class WholeSlideBagFP(torch.utils.data.Dataset):
    """CLAM's ``Whole_Slide_Bag_FP``: one ``read_region`` per patch, transforms per patch."""

    def __init__(self, path: Path, coords: np.ndarray, level: int, size: int) -> None:
        from torchvision import transforms

        self.path, self.coords, self.level, self.size = str(path), coords, level, size
        self.wsi: openslide.OpenSlide | None = None  # opened in the process that reads (as CLAM's workers)
        self.transforms = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, np.ndarray]:
        if self.wsi is None:
            self.wsi = openslide.OpenSlide(self.path)
        coord = self.coords[idx]
        img = self.wsi.read_region(tuple(int(v) for v in coord), self.level, (self.size, self.size))
        return self.transforms(img.convert("RGB")), coord


def clam_baseline(path: Path, coords: np.ndarray, size: int, net: torch.nn.Module, batch: int) -> np.ndarray:
    """CLAM's ``compute_w_loader``: a DataLoader over the coordinates, the encoder per batch."""
    workers = 8 if torch.cuda.is_available() else 0  # CLAM: {'num_workers': 8, ...} on CUDA, else {}
    loader = torch.utils.data.DataLoader(
        WholeSlideBagFP(path, coords, 0, size), batch_size=batch, num_workers=workers
    )
    out = []
    with torch.inference_mode():
        for images, _coords in loader:
            out.append(net(images).reshape(len(images), -1).numpy())
    return np.concatenate(out)


def channel_means(like: Encoder) -> Encoder:
    """A trivial "encoder" (per-channel means) with ``like``'s patches: what reading alone costs."""
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return Encoder(
        "channel-means", net, 3, like.patch_size, like.mpp, like.normalization, trained=False
    )  # fmt: skip


def plugin_features(slide_path: Path, encoder, tissue) -> np.ndarray:
    """The plugin's pipeline as Run and ``napari-pathology features`` use it, with a fresh cache."""
    cache = Path(tempfile.mkdtemp(prefix="clam-bench-"))
    try:
        feats = run_to_completion(
            extract_features(open_slide(slide_path), encoder, tissue=tissue, cache_dir=cache)
        )
        return feats.features
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def timed(function: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def traced_peak(function: Callable[[], object]) -> int:
    """Peak bytes numpy allocated (tracemalloc) during one call."""
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def plugin_heatmap(grid_shape: tuple[int, int], n_classes: int = 3) -> None:
    """The heatmap arrays of the bag runner (``analysis/bag.py``) for a grid with every cell a patch."""
    rows, cols = (a.ravel() for a in np.indices(grid_shape))
    cells = np.stack([rows, cols], 1)
    raw = np.random.default_rng(0).normal(size=(n_classes, len(rows))).astype(np.float32)
    heatmap = np.full(grid_shape, np.nan, np.float32)
    heatmap[rows, cols] = raw[0]
    class_heatmaps = np.full((n_classes, *grid_shape), np.nan, np.float32)
    class_heatmaps[:, rows, cols] = raw
    weights = np.exp(raw[0] - raw[0].max())
    weights /= weights.sum()
    top = np.argsort(-weights, kind="stable")[:8]
    del cells, heatmap, class_heatmaps, top


def clam_heatmap(side: int, patch: int) -> None:
    """CLAM's ``WholeSlideImage.drawHeatmap`` accumulation on a ``side`` x ``side`` region at level 0."""
    overlay = np.full((side, side), 0).astype(float)  # as CLAM: an int64 array, then float64
    counter = np.full((side, side), 0).astype(np.uint16)
    for y in range(0, side, patch):
        for x in range(0, side, patch):
            overlay[y : y + patch, x : x + patch] += 0.5
            counter[y : y + patch, x : x + patch] += 1
    zero = counter == 0
    overlay[~zero] = overlay[~zero] / counter[~zero]
    del overlay, counter, zero


def human(nbytes: float) -> str:
    """Bytes as KB/MB/GB (powers of 1000)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:,.0f} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="synthetic slide side (px, 0.5 um/px)")
    parser.add_argument("--encoder", default="torchvision:resnet18", help="registered encoder (both sides)")
    parser.add_argument("--batch", type=int, default=256, help="baseline batch (CLAM's default 256)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (both)")
    parser.add_argument("--big", type=int, default=100_000, help="slide side for the heatmap memory")
    parser.add_argument(
        "--clam-side", type=int, default=4096, help="region side CLAM's heatmap is measured on"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    OUT.mkdir(exist_ok=True)
    path = OUT / f"clam-bench-{args.size}.tif"
    if not path.exists():
        print(f"writing a {args.size} px synthetic slide...", file=sys.stderr)
        write_synthetic_slide(path, size=args.size, seed=3, mpp=0.5)
    path.read_bytes()  # warm the page cache: both sides read from memory
    encoder = get_encoder(args.encoder)
    slide = open_slide(path)
    tissue = run_to_completion(tissue_or_detect(slide))
    grid = feature_grid(slide, encoder, tissue=tissue)
    coords, size = level0_coords(grid), int(encoder.patch_size)
    print(f"{len(coords)} tissue patches of {size} px; {args.encoder} ({encoder.dim}-d)", file=sys.stderr)

    reader = channel_means(encoder)
    base_t, our_t, base_r, our_r = [], [], [], []
    for k in range(args.rounds):  # alternated so drift (other users of the CPUs) hits both alike
        print(f"round {k + 1}/{args.rounds}: CLAM-style baseline...", file=sys.stderr)
        base_t.append(timed(lambda: clam_baseline(path, coords, size, encoder.net, args.batch)))
        print(f"round {k + 1}/{args.rounds}: plugin...", file=sys.stderr)
        our_t.append(timed(lambda: plugin_features(path, encoder, tissue)))
        print(f"round {k + 1}/{args.rounds}: reading alone, both sides...", file=sys.stderr)
        base_r.append(timed(lambda: clam_baseline(path, coords, size, reader.net, args.batch)))
        our_r.append(timed(lambda: plugin_features(path, reader, tissue)))
    n = len(coords)
    rows = [
        (f"features per slide ({n} patches, {args.encoder})", "patches/s", f"{n / min(base_t):,.1f}",
         f"{n / min(our_t):,.1f}", f"{min(base_t) / min(our_t):.2f}"),
        ("features per slide", "s/slide", f"{min(base_t):,.1f}", f"{min(our_t):,.1f}",
         f"{min(base_t) / min(our_t):.2f}"),
        ("patches read and normalised (channel means, no CNN)", "patches/s", f"{n / min(base_r):,.1f}",
         f"{n / min(our_r):,.1f}", f"{min(base_r) / min(our_r):.2f}"),
    ]  # fmt: skip

    # heatmap memory on a --big px slide, 256 px patches at 0.5 um/px
    patch = 256
    grid_shape = (-(-args.big // patch),) * 2
    ours = traced_peak(lambda: plugin_heatmap(grid_shape))
    measured = traced_peak(lambda: clam_heatmap(args.clam_side, patch))
    per_px = measured / args.clam_side**2
    pixels = float(args.big) ** 2
    rows += [
        (f"heatmap peak, {args.big:,} px slide ({grid_shape[0] * grid_shape[1]:,} patches)", "bytes",
         f"{human(per_px * pixels)}", human(ours), f"{per_px * pixels / ours:,.0f}"),
        ("  CLAM analytic: float64 overlay + uint16 counter (+ int64 temp)", "bytes",
         human(pixels * (8 + 2 + 8)), "", ""),
        ("  full-resolution float32 array alone", "bytes", human(pixels * 4), "", ""),
    ]  # fmt: skip

    print(f"\nCLAM benchmark: {os.cpu_count()} CPU cores, torch {args.threads} threads, {args.size:,} px "
          f"synthetic slide at 0.5 um/px, {args.encoder} (untrained, same network both sides), "
          f"best of {args.rounds}\n")  # fmt: skip
    print("| measure | unit | CLAM-style baseline | napari-pathology | ratio |")
    print("|---|---|---:|---:|---:|")
    for name, unit, base, our, ratio in rows:
        print(f"| {name} | {unit} | {base} | {our} | {ratio} |")
    print(f"\nratio: ours / baseline for rates, baseline / ours for times and bytes (higher is better);\n"
          f"CLAM's heatmap measured on a {args.clam_side:,} px region ({human(measured)} peak, "
          f"{per_px:.1f} B/px) and extrapolated to {args.big:,}^2 px.")  # fmt: skip


if __name__ == "__main__":
    main()
