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
by the tile, not the slide. Where the budget holds more than one tile's
graph, the forward keeps the last ``keep_graphs`` tiles' graphs and the
backward uses them instead of recomputing those tiles
(:func:`.memory.graphs_within` says how many fit).

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
    "graphs_within",
    "plain_step",
    "stream_cam_tiles",
    "stream_features",
    "stream_predict",
    "stream_trunk",
    "streaming_step",
]

from napari_pathology.families.wholeslide.memory import (  # re-exported: the step's memory
    choose_inference_tile,
    choose_tile,
    estimate_inference_bytes,
    estimate_tile_bytes,
    graphs_within,
)
from napari_pathology.families.wholeslide.tiling import Tile, TileSize, geometry, plan_tiles

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
    keep_graphs: int = 1
    backward_tiles: int = 0


class _StreamedTrunk(torch.autograd.Function):
    """Tiled forward (autograd kept for the last ``keep_graphs`` tiles), per-tile backward; see the module."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, options: _Options, *params: torch.Tensor) -> torch.Tensor:
        fmap = None
        kept: dict[int, torch.Tensor] = {}
        o = options
        for i, t in enumerate(o.tiles):
            keep = i >= len(o.tiles) - o.keep_graphs
            with torch.set_grad_enabled(keep), _context(o.device, o.autocast, o.offload and keep):
                y = _run(o.stages, _crop(x, t, o.device, o.channels_last, o.prepare), o.checkpoint and keep)
                y = y[:, :, t.keep[0], t.keep[1]]
            if fmap is None:
                fmap = torch.empty((y.shape[0], y.shape[1], *o.size), dtype=y.dtype, device=o.device)
            fmap[:, :, t.out[0], t.out[1]] = y.detach()
            if keep:
                kept[i] = y
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
        for i in reversed(range(len(o.tiles))):  # kept graphs first (freed as used), the others recomputed
            t = o.tiles[i]
            g = grad[:, :, t.out[0], t.out[1]]
            y = kept.pop(i, None)
            if not bool(g.any()):
                continue  # nothing flows back through this tile's outputs
            with torch.enable_grad():
                if y is None:
                    with _context(o.device, o.autocast, o.offload):
                        y = _run(o.stages, _crop(x, t, o.device, o.channels_last, o.prepare), o.checkpoint)
                        y = y[:, :, t.keep[0], t.keep[1]]
                parts = torch.autograd.grad(y, wanted, g.to(y.dtype), allow_unused=True)
            total = [
                a if b is None else (b if a is None else a + b) for a, b in zip(total, parts, strict=True)
            ]
            o.backward_tiles += 1
            y = None
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
    keep_graphs: int = 1,
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
    keep_graphs : int
        Tiles whose autograd graph the forward keeps for the backward (the
        last ones; at least 1): each kept graph is one tile's recomputation
        saved, at one tile's memory (:func:`graphs_within` says how many fit).

    Other parameters are those of :func:`stream_features`.
    """
    return _stream_trunk(
        stages, x, tile, device, autocast, channels_last, checkpoint, offload, prepare, keep_graphs
    )[0]


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
    keep_graphs: int = 1,
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
    if isinstance(keep_graphs, bool) or not isinstance(keep_graphs, int) or keep_graphs < 1:
        raise ValueError(f"keep_graphs must be a positive integer, got {keep_graphs!r}")
    options = _Options(
        stages, tiles, size, device, autocast, channels_last, checkpoint, offload, prepare, keep_graphs
    )  # fmt: skip
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
    keep_graphs: int = 1,
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
    fmap, options = _stream_trunk(
        stages[:k], x, tile, device, autocast, channels_last, checkpoint, offload, None, keep_graphs
    )  # fmt: skip
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
