"""Model benchmark: patches per second of the metastasis detectors, model-only and end to end.

Run (from the repository root, after the README's set-up)::

    python benchmarks/models.py [--device cpu|cuda:0] [--quick]

Rows, for the full Inception v3 and the 1/8-width small network (299 px):

- *model only*: patches/s of ``predict_proba`` on tensors already in memory,
  with 1 orientation and with the 8 dihedral orientations averaged (Liu et
  al.'s test-time augmentation); on CUDA with mixed precision (autocast).
- *end to end*: tiles/s of ``run_analysis`` on a synthetic slide at 1 um/px
  (reading, decoding, normalising and inference, tissue tiles only), against
  the model-only rate with the same orientations: the ratio says how much of
  the model's speed reaches the user.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from napari_pathology.analysis import RunSettings, run_analysis
from napari_pathology.models import create_model
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import open_slide
from napari_pathology.slide.synthetic import write_synthetic_slide
from napari_pathology.tiles import tta_mean
from napari_pathology.tissue import detect_tissue

OUT = Path(__file__).parent / "out"


def model_only(model: torch.nn.Module, device: torch.device, n: int, tta: bool, batch: int) -> float:
    """Patches per second of the model on random in-memory patches."""
    x = torch.rand(batch, 3, 299, 299, device=device) * 2 - 1
    amp = device.type == "cuda"

    def step() -> None:
        with torch.inference_mode(), torch.autocast(device.type, enabled=amp):
            (tta_mean(model.predict_proba, x) if tta else model.predict_proba(x)).float().cpu()

    step()  # warm-up
    done, start = 0, time.perf_counter()
    while done < n:
        step()
        done += batch
    return done / (time.perf_counter() - start)


def end_to_end(
    model: torch.nn.Module, slide_path: Path, device: str, tta: bool, batch: int
) -> tuple[float, int]:
    """Tiles per second of the engine over a slide's tissue tiles, and the tile count."""
    slide = open_slide(slide_path)
    tissue = run_to_completion(detect_tissue(slide))
    settings = RunSettings(batch_size=batch, device=device, tta=tta)
    start = time.perf_counter()
    result = run_to_completion(run_analysis(slide, model, tissue=tissue, settings=settings))
    return result.tiles_done / (time.perf_counter() - start), result.tiles_done


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer patches, smaller slide")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    size = 3072 if args.quick else 4096
    slide_path = OUT / f"models-bench-{size}.tif"
    if not slide_path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        write_synthetic_slide(slide_path, size=size, seed=99)
    rows = []
    for name, width in (("small (1/8 width)", 0.125), ("full Inception v3", 1.0)):
        model = create_model("metastasis-small-10x" if width < 1 else "metastasis-inception-v3-10x")
        model = model.to(device).eval()
        params = sum(p.numel() for p in model.parameters())
        batch = 32 if device.type == "cuda" or width < 1 else 8
        scale = 1 if device.type == "cuda" else (1 if width < 1 else 0.25)
        n = int((64 if args.quick else 256) * scale)
        for tta in (False, True):
            rate = model_only(model, device, n if not tta else max(batch, n // 4), tta, batch)
            if tta and width == 1.0 and device.type == "cpu":
                e2e, tiles = float("nan"), 0  # 8 x a full Inception per tile: minutes on a CPU
            else:
                e2e, tiles = end_to_end(model, slide_path, args.device, tta, batch)
            rows.append((name, f"{params / 1e6:.2f} M", "8" if tta else "1", rate, e2e, tiles))
            orientations = "8" if tta else "1"
            print(f"... {name}, {orientations}: {rate:.1f} model-only, {e2e:.1f} end to end", file=sys.stderr)
    print(f"\ndevice: {args.device}{' (autocast)' if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} threads; slide {size} px at 0.5 um/px, model at 1 um/px\n")  # fmt: skip
    print("| network | parameters | orientations | model only (tiles/s) | end to end (tiles/s) "
          "| ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, params, orient, rate, e2e, _tiles in rows:
        ratio = f"{e2e / rate:.2f}" if e2e == e2e else "-"
        shown = f"{e2e:.1f}" if e2e == e2e else "not run"
        print(f"| {name} | {params} | {orient} | {rate:.1f} | {shown} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
