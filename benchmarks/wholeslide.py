"""Memory and time of one whole-slide training step: the exact tiled (streaming) path against the plain one.

Run from the repository root::

    python benchmarks/wholeslide.py [--sizes 2048,4096] [--budget-gb 6] [--steps 2]
    python benchmarks/wholeslide.py --device cuda --sizes 21500 --autocast bf16 --budget-gb 60

Each configuration (input side x path) runs in its own subprocess: a
``wholeslide`` ResNet-50 (frozen BatchNorm, global max pooling, 3 classes),
one image of ``side`` x ``side`` px, Adam steps (forward, backward, update)
of the plain full-image path or of the tiled path with the tile chosen from
the memory budget (:func:`~napari_pathology.families.wholeslide.streaming.choose_tile`,
or ``--tile``). The subprocess reports its peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``, the whole process: Python, torch,
model, optimiser, image) and, on a GPU, torch's peak allocated memory; the
time of a step is the fastest of ``--steps`` (the first includes one-time
set-up). The plain path is skipped where its estimated memory (autograd's
saved tensors, measured on the meta device) exceeds what this machine has
available, and the estimate is printed instead. The tiled path's memory
and time are printed beside the plain path's, as ratios. Results are also
written to ``benchmarks/out/wholeslide.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "out"
GiB = 2**30


def _worker(config: dict[str, Any]) -> dict[str, Any]:
    """Run the steps of one configuration here; return what was measured."""
    import torch
    import torch.nn.functional as F

    from napari_pathology.families.wholeslide.model import WholeSlideNet
    from napari_pathology.families.wholeslide.streaming import (
        choose_tile,
        graphs_within,
        plain_step,
        streaming_step,
    )

    device = torch.device(config["device"])
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[config["autocast"]]
    net = WholeSlideNet(3, config["arch"], config["width"]).to(device)
    if config["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    side = config["side"]
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1])
    if config["path"] == "plain":
        x = x.to(device)
    tile = config.get("tile")
    if config["path"] == "tiled" and not tile:
        dtype = autocast or torch.float32
        budget = int(config["budget_gb"] * GiB)
        tile = choose_tile(net, side, side, budget, dtype=dtype, stream_stages=config["stream_stages"])
    keep = 1
    if config["path"] == "tiled":
        keep = config.get("keep_graphs") or graphs_within(
            net, side, side, tile, int(config["budget_gb"] * GiB), dtype=autocast or torch.float32,
            stream_stages=config["stream_stages"],
        )  # fmt: skip
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-5)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds, tiles, backward = [], 1, 1
    for _ in range(config["steps"]):
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if config["path"] == "plain":
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                step = plain_step(net, x, y, F.cross_entropy)
        else:
            step = streaming_step(
                net, x, y, F.cross_entropy, tile, device=device, autocast=autocast,
                channels_last=config["channels_last"], offload=config["offload"],
                stream_stages=config["stream_stages"], keep_graphs=keep,
            )  # fmt: skip
            tiles, backward = step.tiles, step.backward_tiles
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    out = {
        "seconds": seconds,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "base_rss": base_rss,
        "tile": list(tile) if isinstance(tile, tuple | list) else tile,
        "tiles": tiles,
        "backward_tiles": backward,
        "graphs": keep,
        "loss": float(step.loss),
    }
    if device.type == "cuda":
        out["cuda_peak"] = torch.cuda.max_memory_allocated(device)
    return out


def _plain_estimate(config: dict[str, Any]) -> int:
    """Bytes the plain path's autograd keeps (meta device: nothing computed)."""
    import torch

    from napari_pathology.families.wholeslide.model import WholeSlideNet
    from napari_pathology.families.wholeslide.streaming import estimate_tile_bytes

    net = WholeSlideNet(3, config["arch"], config["width"])
    dtype = torch.bfloat16 if config["autocast"] == "bf16" else torch.float32
    return estimate_tile_bytes(net.stages(), config["side"], dtype=dtype)


def _available(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def _run(config: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One configuration in a fresh subprocess (its own peak memory)."""
    command = [sys.executable, __file__, "--worker", json.dumps(config)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,4096", help="input sides (px), comma-separated")
    parser.add_argument("--paths", default="plain,tiled", help="plain, tiled or both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="resnet50", choices=("resnet18", "resnet34", "resnet50"))
    parser.add_argument("--width", type=int, default=64, help="base width (64: torchvision's network)")
    parser.add_argument("--budget-gb", type=float, default=6.0, help="memory budget the tile is chosen from")
    parser.add_argument("--tile", default=None, help="tile side px (or ROWS,COLS) instead of the budget")
    parser.add_argument("--steps", type=int, default=2, help="training steps per configuration")
    parser.add_argument("--autocast", default="none", choices=("none", "bf16", "fp16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--offload", action="store_true", help="save_on_cpu for a tile's activations (GPU)")
    parser.add_argument("--stream-stages", type=int, default=None, help="stages streamed (default: all 5)")
    parser.add_argument(
        "--keep-graphs",
        type=int,
        default=None,
        help="tiles whose graphs the forward keeps (default: the budget's)",
    )
    parser.add_argument(
        "--inputs",
        action="store_true",
        help="measure the slide input instead: pyramid read vs the disk cache",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0
    if args.inputs:
        return _inputs(args.steps)
    tile = [int(v) for v in args.tile.split(",")] if args.tile else None
    base = {
        "device": args.device, "arch": args.arch, "width": args.width, "budget_gb": args.budget_gb,
        "steps": args.steps, "autocast": args.autocast, "channels_last": args.channels_last,
        "offload": args.offload, "stream_stages": args.stream_stages, "keep_graphs": args.keep_graphs,
        "tile": (tile[0] if len(tile) == 1 else tile) if tile else None,
    }  # fmt: skip
    rows = []
    for side in (int(v) for v in args.sizes.split(",")):
        plain = None
        for path in args.paths.split(","):
            config = {**base, "side": side, "path": path}
            note = ""
            if path == "plain":
                need, have = _plain_estimate(config), _available(args.device)
                if need > 0.85 * have:
                    rows.append({**config, "skipped": f"needs ~{_gib(need)} GiB, {_gib(have)} GiB available"})
                    print(f"... {side} px plain: skipped ({rows[-1]['skipped']})", file=sys.stderr)
                    continue
                note = f"estimated {_gib(need)} GiB"
            print(f"... {side} px {path}", file=sys.stderr, flush=True)
            result = {**config, **_run(config, args.timeout), "estimate": note}
            rows.append(result)
            if "error" in result:
                print(f"... {side} px {path}: {result['error']}", file=sys.stderr)
            elif path == "plain":
                plain = result
            if plain is not None and path == "tiled" and "error" not in result:
                result["memory_ratio"] = result["peak_rss"] / plain["peak_rss"]
                result["time_ratio"] = min(result["seconds"]) / min(plain["seconds"])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "wholeslide.json").write_text(json.dumps(rows, indent=1))
    precision = args.autocast if args.autocast != "none" else "float32"
    streamed = f"({args.stream_stages} of 5 stages streamed)" if args.stream_stages else ""
    title = f"{args.arch} width {args.width}, {args.device}, {precision}, budget {args.budget_gb:g} GiB"
    print(f"\n{title} {streamed}".rstrip())
    gpu = args.device.startswith("cuda")
    head = "| input | path | tile | tiles (backward, graphs kept) | peak RSS GiB (before steps) |"
    print(head + (" GPU peak GiB |" if gpu else "") + " s/step | memory vs plain | time vs plain |")
    print("|---|---|---|---|---|" + ("---|" if gpu else "") + "---|---|---|")
    for r in rows:
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or r["error"]
            print(f"| {r['side']} | {r['path']} | - | - | {why} |" + (" - |" if gpu else "") + " - | - | - |")
            continue
        tile = r["tile"]
        tile_text = "x".join(str(v) for v in tile) if isinstance(tile, list) else str(tile or "-")
        tiles = f"{r['tiles']} ({r['backward_tiles']}, {r['graphs']} kept)" if r["path"] == "tiled" else "-"
        mem = f"{r['memory_ratio']:.2f}" if "memory_ratio" in r else "-"
        speed = f"{r['time_ratio']:.2f}" if "time_ratio" in r else "-"
        cuda = f" {_gib(r.get('cuda_peak'))} |" if gpu else ""
        print(f"| {r['side']} | {r['path']} | {tile_text} | {tiles} | {_gib(r['peak_rss'])} "
              f"({_gib(r['base_rss'])}) |{cuda} {min(r['seconds']):.2f} | {mem} | {speed} |")  # fmt: skip
    return 0


def _inputs(repeats: int) -> int:
    """A slide's training input at 2.5 um/px: read from its pyramid, then from the disk cache (ratio)."""
    import tempfile

    from napari_pathology.families.wholeslide.inputs import SlideImages, locate_slide
    from napari_pathology.slide.synthetic import write_synthetic_slide

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for side in (16384,):
            path = Path(folder) / f"slide-{side}.tif"
            write_synthetic_slide(path, size=side, seed=7)
            where = locate_slide(path, 2.5)
            pyramid, cached = [], []
            for k in range(max(1, repeats)):
                images = SlideImages(None, Path(folder) / f"cache-{k}", 2 * GiB)
                start = time.perf_counter()
                image = images.image(where)  # the first epoch: pyramid, written to the cache
                pyramid.append(time.perf_counter() - start)
                start = time.perf_counter()
                again = images.image(where)
                again.sum(dtype="uint64")  # touch every page of the mapped file
                cached.append(time.perf_counter() - start)
            rows.append((side, image.shape, min(pyramid), min(cached)))
    print("\n| slide (0.5 um/px) | input at 2.5 um/px | pyramid read s | cache read s | speed-up |")
    print("|---|---|---:|---:|---:|")
    for side, shape, first, later in rows:
        print(
            f"| {side:,} px | {shape[1]} x {shape[0]} px | {first:.2f} | {later:.3f} | {first / later:.0f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
