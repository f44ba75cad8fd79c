"""How much memory a tiled training step or prediction of the whole-slide CNN needs, and the tile to use.

Sizes are measured on torch's meta device (no memory, no compute): the
tensors autograd saves for a crop (:func:`estimate_tile_bytes`), the
working memory of a forward without gradients
(:func:`estimate_inference_bytes`). From them: the tile of least work that
fits a budget (:func:`choose_tile`, :func:`choose_inference_tile`) and how
many tiles' graphs a step may keep instead of recomputing them
(:func:`graphs_within`). Used by :mod:`.streaming`'s callers. No Qt, no napari.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from napari_pathology.families.wholeslide.tiling import Geometry, TileSize, _axis_plan, _tile_pair, geometry

__all__ = [
    "choose_inference_tile",
    "choose_tile",
    "estimate_inference_bytes",
    "estimate_tile_bytes",
    "graphs_within",
]


def estimate_tile_bytes(
    stages: Sequence[nn.Module],
    crop: int | tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    batch: int = 1,
) -> int:
    """Bytes a forward with autograd keeps for its backward on a ``crop`` x ``crop`` RGB input.

    ``crop`` may also be a full input shape ``(B, C, H, W)``. Measured on the
    meta device (no memory, no compute): the tensors autograd saves, counted
    once each, plus the largest single activation twice for the working
    memory of the backward.
    """
    from torch.func import functional_call

    saved: dict[int, int] = {}
    largest = 0
    keep: list[torch.Tensor] = []  # saved tensors stay alive, so their ids stay unique

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep.append(t)
        saved[id(t)] = t.numel() * t.element_size()
        return t

    shape = tuple(crop) if isinstance(crop, tuple) else (batch, 3, int(crop), int(crop))
    x = torch.empty(shape, device="meta", dtype=dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
        for stage in stages:
            params = {
                n: torch.empty_like(p, device="meta", dtype=dtype).requires_grad_(True)
                for n, p in stage.named_parameters()
            }
            buffers = {n: torch.empty_like(b, device="meta", dtype=dtype) for n, b in stage.named_buffers()}
            x = functional_call(stage, {**params, **buffers}, (x,))
            largest = max(largest, x.numel() * x.element_size())
    return int(sum(saved.values()) + 2 * largest)


def _axis_options(geom: Geometry, axis: int, n: int) -> list[tuple[int, int, int]]:
    """``(tile, total crop length, longest crop)`` for every tile side along one axis."""
    stride = geom.stride
    options = []
    for tile in range(stride, stride * math.ceil(n / stride) + 1, stride):
        lengths = [c.stop - c.start for c, _, _ in _axis_plan(geom, axis, n, tile)]
        options.append((tile, sum(lengths), max(lengths)))
    return options


def _step_costs(
    model: nn.Module, height: int, width: int, dtype: torch.dtype, stream_stages: int | None
) -> tuple[Geometry, float, float]:
    """The streamed stages' geometry, a step's bytes besides the tiles, a tile's bytes per crop pixel."""
    stages = list(model.stages())
    k = len(stages) if stream_stages is None else int(stream_stages)
    streamed, rest = stages[:k], stages[k:]
    geom = geometry(streamed)
    size = (geom.size(0, height), geom.size(1, width))
    item = torch.empty((), dtype=dtype).element_size()
    per_px = _tile_bytes_per_px(model, streamed, dtype, k)
    channels = _out_channels(streamed)
    fixed = 4 * sum(p.numel() * p.element_size() for p in model.parameters())
    fixed += 3 * channels * size[0] * size[1] * item  # the stitched map, its gradient, a tile's copy
    fixed += height * width * 3 * 4  # the image itself
    if rest:
        fixed += estimate_tile_bytes(rest, (1, channels, *size), dtype=dtype)
    return geom, fixed, per_px


#: One tile's autograd bytes per crop pixel, per model (by weak reference), dtype and streamed stages.
_PER_PX: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, int], float]] = weakref.WeakKeyDictionary()


def _tile_bytes_per_px(model: nn.Module, streamed: Sequence[nn.Module], dtype: torch.dtype, k: int) -> float:
    """:func:`estimate_tile_bytes` of a 256 px crop per pixel, measured once per model (linear in area)."""
    known = _PER_PX.setdefault(model, {})
    if (dtype, k) not in known:
        probe = 256
        known[dtype, k] = estimate_tile_bytes(streamed, probe, dtype=dtype) / probe**2
    return known[dtype, k]


def graphs_within(
    model: nn.Module,
    height: int,
    width: int,
    tile: TileSize,
    budget: int,
    *,
    dtype: torch.dtype = torch.float32,
    stream_stages: int | None = None,
) -> int:
    """How many tiles' autograd graphs a step may keep within ``budget`` bytes (at least 1, at most all).

    Each graph kept by the forward is one tile's forward the backward need
    not recompute; the rest of the budget is counted as in :func:`choose_tile`.
    """
    geom, fixed, per_px = _step_costs(model, height, width, dtype, stream_stages)
    th, tw = _tile_pair(tile, geom.stride)
    crop, tiles = _largest_crop(geom, height, width, th, tw)
    return int(min(tiles, max(1, (budget - fixed) // (per_px * crop))))


def _largest_crop(geom: Geometry, height: int, width: int, th: int, tw: int) -> tuple[int, int]:
    """``(pixels, tiles)``: the largest input crop of ``th`` x ``tw`` tiles over an image; their count."""
    rows, cols = _axis_plan(geom, 0, height, th), _axis_plan(geom, 1, width, tw)
    longest = max(r[0].stop - r[0].start for r in rows) * max(c[0].stop - c[0].start for c in cols)
    return longest, len(rows) * len(cols)


def choose_tile(
    model: nn.Module,
    height: int,
    width: int,
    budget: int,
    *,
    dtype: torch.dtype = torch.float32,
    stream_stages: int | None = None,
) -> tuple[int, int]:
    """The tile ``(rows, columns)`` (px, multiples of the stride) of least work within ``budget`` bytes.

    Counts the model's parameters four times (weights, gradients, Adam's two
    moments), the image, the stitched feature map and its gradient, the rest
    of the network run whole, and one tile's autograd memory
    (:func:`estimate_tile_bytes`); among the tiles that fit, the one whose
    crops cover the fewest pixels in all (overlap is recomputation), then
    the fewest tiles. The interpreter and torch's own libraries are not
    counted: on a CPU, keep about 0.8 GB of a machine's memory for them
    (measured: a 6 GiB budget peaked at 6.1 GiB resident at 4,096 px).

    Raises
    ------
    ValueError
        The budget does not hold even the smallest tile; the message says how much is needed.
    """
    geom, fixed, per_px = _step_costs(model, height, width, dtype, stream_stages)
    rows, cols = _axis_options(geom, 0, height), _axis_options(geom, 1, width)
    best = None
    for th, row_total, row_max in rows:
        for tw, col_total, col_max in cols:
            if fixed + per_px * row_max * col_max > budget:
                continue
            key = (row_total * col_total, -th * tw)
            if best is None or key < best[0]:
                best = (key, (th, tw))
    if best is None:
        least = fixed + per_px * rows[0][2] * cols[0][2]
        raise ValueError(
            f"a {height} x {width} px input needs more than the {budget / 2**30:.2f} GiB budget for a "
            f"training step (at least {least / 2**30:.2f} GiB): "
            "raise the memory budget, lower the input size (um/px) or use mixed precision"
        )
    return best[1]


def estimate_inference_bytes(
    stages: Sequence[nn.Module], crop: int, *, dtype: torch.dtype = torch.float32, batch: int = 1
) -> int:
    """Bytes a forward without gradients needs on a ``crop`` x ``crop`` RGB input (working memory).

    Measured on the meta device: four times the largest output of any layer
    (a residual block holds its input, two intermediates and its output at once).
    """
    largest = 0

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal largest
        if torch.is_tensor(output):
            largest = max(largest, output.numel() * output.element_size())

    from torch.func import functional_call

    x = torch.empty((batch, 3, int(crop), int(crop)), device="meta", dtype=dtype)
    with torch.no_grad():
        for stage in stages:
            handles = [m.register_forward_hook(hook) for m in stage.modules()]
            try:
                state = {
                    n: torch.empty_like(v, device="meta", dtype=dtype) for n, v in stage.state_dict().items()
                }
                x = functional_call(stage, state, (x,))
            finally:
                for handle in handles:
                    handle.remove()
    return int(4 * largest)


def choose_inference_tile(model: nn.Module, height: int, width: int, budget: int) -> int:
    """The largest square tile (px, a multiple of the stride) whose prediction fits ``budget`` bytes.

    Counts the parameters, the uint8 image, the class maps and one tile's
    working memory (:func:`estimate_inference_bytes`, scaled by the crop's
    area); larger tiles recompute less overlap.

    Raises
    ------
    ValueError
        The budget does not hold even the smallest tile; the message says how much is needed.
    """
    stages = list(model.stages())
    geom = geometry(stages)
    size = (geom.size(0, height), geom.size(1, width))
    probe = 256
    per_px = estimate_inference_bytes(stages, probe) / probe**2
    fixed = sum(p.numel() * p.element_size() for p in model.parameters())
    fixed += height * width * 3 + 2 * int(model.fc.weight.shape[0]) * size[0] * size[1] * 4
    stride = geom.stride
    longest = stride * math.ceil(max(height, width) / stride)
    best = None
    for tile in range(stride, longest + stride, stride):
        if fixed + per_px * _largest_crop(geom, height, width, tile, tile)[0] > budget:
            break
        best = tile
    if best is None:
        least = fixed + per_px * _largest_crop(geom, height, width, stride, stride)[0]
        raise ValueError(
            f"a {height} x {width} px input needs at least {least / 2**30:.2f} GiB to predict, more than "
            f"the {budget / 2**30:.2f} GiB budget"
        )
    return best


def _out_channels(stages: Sequence[nn.Module]) -> int:
    for stage in reversed(stages):
        convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
        if convs:
            return int(convs[-1].out_channels)
    return 3
