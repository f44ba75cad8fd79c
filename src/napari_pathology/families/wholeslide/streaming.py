"""Exact tiled ("streaming") forward and backward passes of a CNN trunk over a whole slide.

The idea of Pinckaers et al. (TPAMI 2020, *Streaming convolutional neural
networks for end-to-end learning with multi-megapixel images*): a
convolutional trunk is run tile by tile, each tile's input crop carrying
enough overlap for the receptive field of the outputs it keeps, so the
stitched feature map equals the full-image one exactly. The global max
pooling and the head then run on the stitched map. Backward: the gradient of
the loss with respect to the stitched map is computed once; each tile's
forward is then recomputed with autograd (activation checkpointing) and the
slice of that gradient belonging to the tile's kept outputs is
backpropagated, accumulating the parameter gradients. Peak memory is bounded
by the tile, not the slide.

Exactness rests on two rules, both enforced by :func:`.tiling.plan_tiles`:

- every crop starts at a multiple of the trunk's total stride, so each
  strided layer samples the same positions as in the full pass;
- a crop covers the whole receptive field (kernel taps of every layer,
  computed exactly from the layers, see :mod:`.tiling`) of the outputs
  the tile keeps, clipped to the image: where the crop meets the image's
  own edge the layers' zero (or -inf) padding is the same as in the full
  pass; the wrong values that padding at the crop's interior edges produces
  stay outside the kept outputs.

Where the loss's gradient with respect to a tile's outputs is zero (global
max pooling makes it sparse) the tile's backward is skipped: exactly, since
it would add nothing. Only the first ``stream_stages`` stages may be
streamed (Pinckaers et al. stream the early, high-resolution layers and run
the rest whole). No Qt, no napari.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "StepResult",
    "choose_inference_tile",
    "choose_tile",
    "estimate_inference_bytes",
    "estimate_tile_bytes",
    "plain_step",
    "stream_cam_tiles",
    "stream_features",
    "stream_predict",
    "stream_trunk",
    "streaming_step",
]

from napari_pathology.families.wholeslide.tiling import (
    Geometry,
    Tile,
    TileSize,
    _axis_plan,
    geometry,
    plan_tiles,
)

# --------------------------------------------------------------------------- passes


def _run(stages: Sequence[nn.Module], x: torch.Tensor, checkpoint: bool) -> torch.Tensor:
    for stage in stages:
        if checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint as ckpt

            x = ckpt(stage, x, use_reentrant=False)
        else:
            x = stage(x)
    return x


@contextlib.contextmanager
def _context(device: torch.device, autocast: torch.dtype | None, offload: bool = False) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if autocast is not None:
            stack.enter_context(torch.autocast(device.type, dtype=autocast))
        if offload and device.type != "cpu":
            stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda"))
        yield


Prepare = Callable[[torch.Tensor], torch.Tensor]


def _crop(
    x: torch.Tensor, tile: Tile, device: torch.device, channels_last: bool, prepare: Prepare | None = None
) -> torch.Tensor:
    crop = x[:, :, tile.crop[0], tile.crop[1]].to(device, non_blocking=True)
    crop = prepare(crop) if prepare is not None else crop
    return crop.contiguous(memory_format=torch.channels_last) if channels_last else crop


def _check_input(x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got {getattr(x, 'shape', type(x).__name__)}")


def _tiles(stages: Sequence[nn.Module], x: torch.Tensor, tile: TileSize) -> list[Tile]:
    _check_input(x)
    return plan_tiles(geometry(stages), int(x.shape[2]), int(x.shape[3]), tile)


def stream_features(
    stages: Sequence[nn.Module],
    x: torch.Tensor,
    tile: TileSize,
    *,
    device: torch.device | str | None = None,
    autocast: torch.dtype | None = None,
    channels_last: bool = False,
    prepare: Prepare | None = None,
) -> torch.Tensor:
    """The output of ``stages`` on ``x`` computed tile by tile, without gradients (equal to the full pass).

    Parameters
    ----------
    stages : sequence of Module
        Layers run in order (e.g. ``WholeSlideNet.stages()``).
    x : Tensor
        ``(B, C, H, W)`` images; may stay on the CPU while ``device`` computes.
    tile : int or (int, int)
        Side (px) of the input block whose outputs one tile keeps, a multiple of
        the total stride; or its ``(rows, columns)``.
    device : device, optional
        Where the tiles run and the stitched map lives (default: ``x``'s device).
    autocast : dtype, optional
        Mixed precision (``torch.bfloat16``...); None runs in ``x``'s dtype.
    channels_last : bool
        Run the crops in channels-last memory format.
    prepare : callable, optional
        Maps each crop of ``x`` (already on ``device``) to the network's input,
        so ``x`` may stay a uint8 image while each crop is normalised on its own.
    """
    device = torch.device(device) if device is not None else x.device
    out = None
    with torch.no_grad(), _context(device, autocast):
        for t in _tiles(stages, x, tile):
            y = _run(stages, _crop(x, t, device, channels_last, prepare), False)
            if out is None:
                geom = geometry(stages)
                size = (geom.size(0, int(x.shape[2])), geom.size(1, int(x.shape[3])))
                out = y.new_empty((y.shape[0], y.shape[1], *size))
            out[:, :, t.out[0], t.out[1]] = y[:, :, t.keep[0], t.keep[1]]
    assert out is not None  # plan_tiles returns at least one tile
    return out


@dataclass
class StepResult:
    """One training step's outputs: the ``loss`` and ``logits`` (detached), and how many tiles ran."""

    loss: torch.Tensor
    logits: torch.Tensor
    tiles: int
    backward_tiles: int


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class _Options:
    stages: list[nn.Module]
    tiles: list[Tile]
    size: tuple[int, int]
    device: torch.device
    autocast: torch.dtype | None
    channels_last: bool
    checkpoint: bool
    offload: bool
    prepare: Prepare | None = None
    backward_tiles: int = 0


class _StreamedTrunk(torch.autograd.Function):
    """Tiled forward (no autograd but the last tile's), per-tile recomputed backward; see the module."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, options: _Options, *params: torch.Tensor) -> torch.Tensor:
        fmap = kept = None
        o = options
        for i, t in enumerate(o.tiles):
            last = i == len(o.tiles) - 1
            with torch.set_grad_enabled(last), _context(o.device, o.autocast, o.offload and last):
                y = _run(o.stages, _crop(x, t, o.device, o.channels_last, o.prepare), o.checkpoint and last)
                y = y[:, :, t.keep[0], t.keep[1]]
            if fmap is None:
                fmap = torch.empty((y.shape[0], y.shape[1], *o.size), dtype=y.dtype, device=o.device)
            fmap[:, :, t.out[0], t.out[1]] = y.detach()
            kept = y if last else None
            del y
        assert fmap is not None  # plan_tiles returns at least one tile
        ctx.options, ctx.kept, ctx.params = o, kept, params
        ctx.save_for_backward(x)
        return fmap

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (x,) = ctx.saved_tensors
        o, kept, params = ctx.options, ctx.kept, ctx.params
        ctx.kept = None
        wanted = [p for p in params if p.requires_grad]
        total: list[torch.Tensor | None] = [None] * len(wanted)
        for i in reversed(range(len(o.tiles))):  # the last tile from its kept graph, the others recomputed
            t = o.tiles[i]
            g = grad[:, :, t.out[0], t.out[1]]
            if not bool(g.any()):
                kept = None
                continue  # nothing flows back through this tile's outputs
            with torch.enable_grad():
                if kept is None:
                    with _context(o.device, o.autocast, o.offload):
                        y = _run(o.stages, _crop(x, t, o.device, o.channels_last, o.prepare), o.checkpoint)
                        kept = y[:, :, t.keep[0], t.keep[1]]
                parts = torch.autograd.grad(kept, wanted, g.to(kept.dtype), allow_unused=True)
            total = [
                a if b is None else (b if a is None else a + b) for a, b in zip(total, parts, strict=True)
            ]
            o.backward_tiles += 1
            kept = y = None
        found = iter(total)
        return (None, None, *(next(found) if p.requires_grad else None for p in params))


def stream_trunk(
    stages: Sequence[nn.Module],
    x: torch.Tensor,
    tile: TileSize,
    *,
    device: torch.device | str | None = None,
    autocast: torch.dtype | None = None,
    channels_last: bool = False,
    checkpoint: bool = False,
    offload: bool = False,
    prepare: Prepare | None = None,
) -> torch.Tensor:
    """The output of ``stages`` on ``x`` tile by tile, differentiable: its backward is the tiled one.

    Memory holds one tile's autograd graph, never the whole image's: the
    forward keeps only the stitched map (and the last tile's graph), the
    backward recomputes each tile with autograd and backpropagates its slice
    of the incoming gradient into the parameters (tiles whose slice is zero
    are skipped). Use it like the stages themselves, e.g. inside a
    ``forward`` hook of :func:`napari_pathology.training.loop.fit`; the
    gradient does not flow into ``x``.

    Parameters
    ----------
    checkpoint : bool
        Also checkpoint each stage inside a tile's recomputation (less memory, one more forward).
    offload : bool
        On a GPU, keep a tile's saved activations in host memory (``save_on_cpu``).

    Other parameters are those of :func:`stream_features`.
    """
    return _stream_trunk(stages, x, tile, device, autocast, channels_last, checkpoint, offload, prepare)[0]


def _stream_trunk(
    stages: Sequence[nn.Module],
    x: torch.Tensor,
    tile: TileSize,
    device: torch.device | str | None,
    autocast: torch.dtype | None,
    channels_last: bool,
    checkpoint: bool,
    offload: bool,
    prepare: Prepare | None = None,
) -> tuple[torch.Tensor, _Options | None]:
    stages = list(stages)
    params = [p for stage in stages for p in stage.parameters()]
    if not torch.is_grad_enabled() or not any(p.requires_grad for p in params):
        fmap = stream_features(
            stages, x, tile, device=device, autocast=autocast, channels_last=channels_last, prepare=prepare
        )  # fmt: skip
        return fmap, None
    device = torch.device(device) if device is not None else x.device
    geom = geometry(stages)
    tiles = _tiles(stages, x, tile)
    size = (geom.size(0, int(x.shape[2])), geom.size(1, int(x.shape[3])))
    if autocast is None and torch.is_autocast_enabled(device.type):
        autocast = torch.get_autocast_dtype(device.type)
    options = _Options(stages, tiles, size, device, autocast, channels_last, checkpoint, offload, prepare)
    return _StreamedTrunk.apply(x.detach(), options, *params), options


def streaming_step(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    loss_fn: LossFn,
    tile: TileSize,
    *,
    stream_stages: int | None = None,
    device: torch.device | str | None = None,
    autocast: torch.dtype | None = None,
    channels_last: bool = False,
    checkpoint: bool = False,
    offload: bool = False,
) -> StepResult:
    """Forward and backward of one step, tile by tile: accumulates every parameter's ``.grad`` exactly.

    ``model`` has ``stages()`` (the trunk's stages in order) and ``head(fmap)``
    (pooling and classifier), as :class:`~.model.WholeSlideNet`. The first
    ``stream_stages`` stages (default: all) are streamed (:func:`stream_trunk`);
    the rest, the pooling and the head run whole on the stitched map. The
    gradients equal those of ``loss_fn(model(x), target).backward()`` (up to
    float rounding); like ``backward`` they add to existing ``.grad``.
    Parameters are those of :func:`stream_trunk`.
    """
    stages = list(model.stages())
    k = len(stages) if stream_stages is None else stream_stages
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(stages):
        raise ValueError(f"stream_stages must be from 1 to {len(stages)}, got {stream_stages!r}")
    device = torch.device(device) if device is not None else x.device
    fmap, options = _stream_trunk(stages[:k], x, tile, device, autocast, channels_last, checkpoint, offload)
    if options is None:
        raise ValueError("a training step needs autograd enabled and parameters that require gradients")
    with _context(device, autocast):
        logits = model.head(_run(stages[k:], fmap, checkpoint))
    loss = loss_fn(logits.float(), target.to(device))
    loss.backward()
    return StepResult(loss.detach(), logits.detach(), len(options.tiles), options.backward_tiles)


def plain_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn: LossFn) -> StepResult:
    """The reference: ``loss_fn(model(x), target).backward()`` on the whole image at once."""
    logits = model(x)
    loss = loss_fn(logits.float(), target.to(logits.device))
    loss.backward()
    return StepResult(loss.detach(), logits.detach(), 1, 1)


CamTile = tuple[slice, slice, torch.Tensor]


def stream_cam_tiles(
    model: nn.Module,
    x: torch.Tensor,
    tile: TileSize,
    *,
    device: torch.device | str | None = None,
    autocast: torch.dtype | None = None,
    channels_last: bool = False,
    prepare: Prepare | None = None,
) -> Generator[CamTile, None, torch.Tensor]:
    """Every class's activation map tile by tile: yields ``(rows, cols, maps)``, returns the logits.

    ``maps`` ``(B, K, h, w)`` (on the CPU) fills ``rows, cols`` of the output
    grid; the logits ``(B, K)`` come once every tile ran (global max pooling
    of the running maximum of the features). Without gradients; memory holds
    one tile's activations, never the whole feature map. ``prepare`` maps a
    crop of ``x`` (already on ``device``) to the network's input, so ``x`` may
    stay a uint8 image while each crop is normalised on its own.
    Other parameters are those of :func:`stream_features`.
    """
    stages = list(model.stages())
    device = torch.device(device) if device is not None else x.device
    weight, bias = model.fc.weight, model.fc.bias
    pooled = None
    with torch.no_grad():
        for t in _tiles(stages, x, tile):
            with _context(device, autocast):
                crop = _crop(x, t, device, channels_last, prepare)
                y = _run(stages, crop, False)[:, :, t.keep[0], t.keep[1]]
            y = y.to(weight.dtype)
            top = y.amax(dim=(2, 3))
            pooled = top if pooled is None else torch.maximum(pooled, top)
            maps = torch.einsum("bchw,kc->bkhw", y, weight) + bias.reshape(1, -1, 1, 1)
            del y
            yield t.out[0], t.out[1], maps.cpu()
        assert pooled is not None  # plan_tiles returns at least one tile
        return model.fc(pooled)


def stream_predict(
    model: nn.Module,
    x: torch.Tensor,
    tile: TileSize,
    *,
    device: torch.device | str | None = None,
    autocast: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(B, K)`` and every class's activation map ``(B, K, h, w)``, tile by tile, no gradients.

    Only the running max of the features and the K class maps are kept (never
    the whole feature map), so memory stays bounded by the tile. The class
    maps are ``model.cam`` of the stitched feature map, one per class (on the CPU).
    """
    geom = geometry(list(model.stages()))
    size = (geom.size(0, int(x.shape[2])), geom.size(1, int(x.shape[3])))
    cams = None
    steps = stream_cam_tiles(model, x, tile, device=device, autocast=autocast, channels_last=channels_last)
    while True:
        try:
            rows, cols, maps = next(steps)
        except StopIteration as done:
            assert cams is not None
            return done.value, cams
        if cams is None:
            cams = maps.new_empty((maps.shape[0], maps.shape[1], *size))
        cams[:, :, rows, cols] = maps


# --------------------------------------------------------------------------- memory


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
    stages = list(model.stages())
    k = len(stages) if stream_stages is None else int(stream_stages)
    streamed, rest = stages[:k], stages[k:]
    geom = geometry(streamed)
    size = (geom.size(0, height), geom.size(1, width))
    item = torch.empty((), dtype=dtype).element_size()
    probe = 256
    per_px = estimate_tile_bytes(streamed, probe, dtype=dtype) / probe**2
    channels = _out_channels(streamed)
    fixed = 4 * sum(p.numel() * p.element_size() for p in model.parameters())
    fixed += 3 * channels * size[0] * size[1] * item  # the stitched map, its gradient, a tile's copy
    fixed += height * width * 3 * 4  # the image itself
    if rest:
        fixed += estimate_tile_bytes(rest, (1, channels, *size), dtype=dtype)
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
        rows, cols = _axis_plan(geom, 0, height, tile), _axis_plan(geom, 1, width, tile)
        crop_h = max(r[0].stop - r[0].start for r in rows)
        crop_w = max(c[0].stop - c[0].start for c in cols)
        if fixed + per_px * crop_h * crop_w > budget:
            break
        best = tile
    if best is None:
        rows, cols = _axis_plan(geom, 0, height, stride), _axis_plan(geom, 1, width, stride)
        least = fixed + per_px * max(r[0].stop - r[0].start for r in rows) * max(
            c[0].stop - c[0].start for c in cols
        )
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
