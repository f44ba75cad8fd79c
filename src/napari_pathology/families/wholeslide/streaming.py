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

Exactness rests on two rules, both enforced by :func:`plan_tiles`:

- every crop starts at a multiple of the trunk's total stride, so each
  strided layer samples the same positions as in the full pass;
- a crop covers the whole receptive field (kernel taps of every layer,
  computed exactly from the layers, see :class:`Geometry`) of the outputs
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "Geometry",
    "StepResult",
    "Tile",
    "choose_tile",
    "estimate_tile_bytes",
    "geometry",
    "plain_step",
    "plan_tiles",
    "stream_features",
    "stream_predict",
    "streaming_step",
]

#: Layers that act on each pixel alone (no spatial extent): they pass spans and sizes through.
_POINTWISE = (nn.ReLU, nn.Identity, nn.Dropout, nn.BatchNorm2d, nn.SiLU, nn.GELU)


# --------------------------------------------------------------------------- geometry


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, tuple | list) else (int(value), int(value))


def _ops(module: nn.Module) -> list[Any]:
    """The spatial operations of ``module`` in order: ``(k, s, p, d)`` per axis or ``("res", main, skip)``."""
    from napari_pathology.families.wholeslide.model import AffineBatchNorm2d

    if isinstance(module, nn.Conv2d | nn.MaxPool2d):
        if isinstance(module, nn.MaxPool2d) and module.ceil_mode:
            raise ValueError("a max pooling with ceil_mode=True cannot be streamed exactly")
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise ValueError(f"a convolution with {module.padding_mode!r} padding cannot be streamed exactly")
        k, s, p, d = (_pair(getattr(module, a)) for a in ("kernel_size", "stride", "padding", "dilation"))
        return [tuple(zip(k, s, p, d, strict=True))]
    if isinstance(module, (*_POINTWISE, AffineBatchNorm2d)):
        if isinstance(module, nn.BatchNorm2d):
            raise ValueError("BatchNorm2d uses batch statistics in training: freeze it (freeze_batch_norm)")
        return []
    if isinstance(module, nn.Sequential):
        return [op for child in module for op in _ops(child)]
    name = type(module).__name__
    if name in ("BasicBlock", "Bottleneck") and hasattr(module, "conv2"):  # torchvision's ResNet blocks
        convs = [module.conv1, module.conv2] + ([module.conv3] if hasattr(module, "conv3") else [])
        skip = _ops(module.downsample) if module.downsample is not None else []
        return [("res", [op for conv in convs for op in _ops(conv)], skip)]
    raise ValueError(f"cannot stream a {name} layer: its spatial extent is unknown")


def _span(ops: Sequence[Any], axis: int, lo: int, hi: int) -> tuple[int, int]:
    """Input index range ``[lo', hi']`` (may reach into padding) that outputs ``[lo, hi]`` read."""
    for op in reversed(ops):
        if op[0] == "res":
            a = _span(op[1], axis, lo, hi)
            b = _span(op[2], axis, lo, hi)
            lo, hi = min(a[0], b[0]), max(a[1], b[1])
        else:
            k, s, p, d = op[axis]
            lo, hi = lo * s - p, hi * s - p + d * (k - 1)
    return lo, hi


def _size(ops: Sequence[Any], axis: int, n: int) -> int:
    """Output length along ``axis`` for an input of length ``n``."""
    for op in ops:
        if op[0] == "res":
            main, skip = _size(op[1], axis, n), _size(op[2], axis, n)
            if main != skip:
                raise ValueError(f"a residual block's paths disagree in size ({main} vs {skip}) at input {n}")
            n = main
        else:
            k, s, p, d = op[axis]
            n = (n + 2 * p - d * (k - 1) - 1) // s + 1
        if n < 1:
            raise ValueError("the input is too small for the network (a feature map became empty)")
    return n


def _stride(ops: Sequence[Any], axis: int) -> int:
    total = 1
    for op in ops:
        total *= _stride(op[1], axis) if op[0] == "res" else op[axis][1]
    return total


@dataclass(frozen=True)
class Geometry:
    """Spatial bookkeeping of a sequence of layers: total stride, receptive spans, output sizes."""

    ops: tuple[Any, ...]

    @property
    def stride(self) -> int:
        """Total stride (the same along both axes is required)."""
        sy, sx = _stride(self.ops, 0), _stride(self.ops, 1)
        if sy != sx:
            raise ValueError(f"the network's strides differ between axes ({sy} vs {sx})")
        return sy

    def span(self, axis: int, lo: int, hi: int) -> tuple[int, int]:
        """Input indices ``[lo', hi']`` that outputs ``lo..hi`` (inclusive) depend on, padding included."""
        return _span(self.ops, axis, lo, hi)

    def size(self, axis: int, n: int) -> int:
        """Output length for an input of length ``n``."""
        return _size(self.ops, axis, n)

    @property
    def margin(self) -> int:
        """Overlap (px) a tile's crop needs on each side beyond its kept outputs' own stride cells."""
        lo, hi = self.span(0, 0, 0)
        return max(-lo, hi - (self.stride - 1))


def geometry(modules: nn.Module | Sequence[nn.Module]) -> Geometry:
    """The :class:`Geometry` of a module or of modules run in sequence.

    Raises
    ------
    ValueError
        A layer whose spatial extent is unknown or that cannot be streamed exactly.
    """
    if isinstance(modules, nn.Module):
        modules = [modules]
    return Geometry(tuple(op for m in modules for op in _ops(m)))


@dataclass(frozen=True)
class Tile:
    """One tile: its input ``crop``, the region ``out`` of the stitched map it fills from its ``keep``."""

    crop: tuple[slice, slice]
    out: tuple[slice, slice]
    keep: tuple[slice, slice]


def _axis_plan(geom: Geometry, axis: int, n_in: int, tile: int) -> list[tuple[slice, slice, slice]]:
    stride = geom.stride
    n_out = geom.size(axis, n_in)
    step = tile // stride
    plans = []
    for a in range(0, n_out, step):
        b = min(a + step, n_out)
        lo, hi = geom.span(axis, a, b - 1)
        c0 = max(0, lo) // stride * stride
        c1 = min(n_in, hi + 1)
        k0 = a - c0 // stride
        if k0 + (b - a) > geom.size(axis, c1 - c0):
            raise AssertionError(f"tile crop {c0}:{c1} does not reach outputs {a}:{b}")  # a geometry bug
        plans.append((slice(c0, c1), slice(a, b), slice(k0, k0 + b - a)))
    return plans


TileSize = int | tuple[int, int]


def _tile_pair(tile: TileSize, stride: int) -> tuple[int, int]:
    pair = tuple(tile) if isinstance(tile, tuple | list) else (tile, tile)
    if len(pair) != 2 or any(
        isinstance(t, bool) or not isinstance(t, int) or t < stride or t % stride for t in pair
    ):
        raise ValueError(
            f"the tile side must be a positive multiple of the network's stride {stride}, got {tile!r}"
        )
    return pair[0], pair[1]


def plan_tiles(geom: Geometry, height: int, width: int, tile: TileSize) -> list[Tile]:
    """The tiles covering an image: kept output blocks of ``tile`` px each (a multiple of the stride).

    ``tile`` is one side for square tiles or ``(rows, columns)``; a side at
    least the image's makes strips.

    Raises
    ------
    ValueError
        A tile side that is not a positive multiple of the total stride.
    """
    th, tw = _tile_pair(tile, geom.stride)
    rows, cols = _axis_plan(geom, 0, height, th), _axis_plan(geom, 1, width, tw)
    return [Tile((r[0], c[0]), (r[1], c[1]), (r[2], c[2])) for r in rows for c in cols]


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


def _crop(x: torch.Tensor, tile: Tile, device: torch.device, channels_last: bool) -> torch.Tensor:
    crop = x[:, :, tile.crop[0], tile.crop[1]].to(device, non_blocking=True)
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
    """
    device = torch.device(device) if device is not None else x.device
    out = None
    with torch.no_grad(), _context(device, autocast):
        for t in _tiles(stages, x, tile):
            y = _run(stages, _crop(x, t, device, channels_last), False)
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
    ``stream_stages`` stages (default: all) are streamed; the rest, the
    pooling and the head run whole on the stitched map. The gradients equal
    those of ``loss_fn(model(x), target).backward()`` (up to float rounding);
    like ``backward`` they add to existing ``.grad`` (zero them first).

    Parameters
    ----------
    checkpoint : bool
        Also checkpoint each stage inside a tile's recomputation (less memory, one more forward).
    offload : bool
        On a GPU, keep a tile's saved activations in host memory (``save_on_cpu``).

    Other parameters are those of :func:`stream_features`.
    """
    stages = list(model.stages())
    k = len(stages) if stream_stages is None else int(stream_stages)
    if not 1 <= k <= len(stages):
        raise ValueError(f"stream_stages must be from 1 to {len(stages)}, got {stream_stages!r}")
    streamed, rest = stages[:k], stages[k:]
    device = torch.device(device) if device is not None else x.device
    tiles = _tiles(streamed, x, tile)
    geom = geometry(streamed)
    size = (geom.size(0, int(x.shape[2])), geom.size(1, int(x.shape[3])))
    fmap = kept = None
    # forward: every tile without autograd but the last, whose graph is kept for the backward
    for i, t in enumerate(tiles):
        last = i == len(tiles) - 1
        with torch.set_grad_enabled(last), _context(device, autocast, offload and last):
            y = _run(streamed, _crop(x, t, device, channels_last), checkpoint and last)
            y = y[:, :, t.keep[0], t.keep[1]]
        if fmap is None:
            fmap = torch.empty((y.shape[0], y.shape[1], *size), dtype=y.dtype, device=device)
        fmap[:, :, t.out[0], t.out[1]] = y.detach()
        kept = y if last else None
        del y
    assert fmap is not None and kept is not None  # plan_tiles returns at least one tile
    fmap.requires_grad_(True)
    with _context(device, autocast):
        logits = model.head(_run(rest, fmap, checkpoint))
    loss = loss_fn(logits.float(), target.to(device))
    loss.backward()
    grad = fmap.grad
    done = 0
    # backward: the last tile from its kept graph, then each other tile recomputed with autograd
    for i in reversed(range(len(tiles))):
        t = tiles[i]
        g = grad[:, :, t.out[0], t.out[1]]
        if not bool(g.any()):
            kept = None
            continue  # nothing flows back through this tile's outputs
        if kept is None:
            with torch.enable_grad(), _context(device, autocast, offload):
                y = _run(streamed, _crop(x, t, device, channels_last), checkpoint)
                kept = y[:, :, t.keep[0], t.keep[1]]
        torch.autograd.backward(kept, g.to(kept.dtype))
        done += 1
        kept = y = None
    return StepResult(loss.detach(), logits.detach(), len(tiles), done)


def plain_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn: LossFn) -> StepResult:
    """The reference: ``loss_fn(model(x), target).backward()`` on the whole image at once."""
    logits = model(x)
    loss = loss_fn(logits.float(), target.to(logits.device))
    loss.backward()
    return StepResult(loss.detach(), logits.detach(), 1, 1)


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
    maps are ``model.cam`` of the stitched feature map, one per class.
    """
    stages = list(model.stages())
    geom = geometry(stages)
    device = torch.device(device) if device is not None else x.device
    size = (geom.size(0, int(x.shape[2])), geom.size(1, int(x.shape[3])))
    weight, bias = model.fc.weight, model.fc.bias
    pooled = cams = None
    with torch.no_grad(), _context(device, autocast):
        for t in _tiles(stages, x, tile):
            y = _run(stages, _crop(x, t, device, channels_last), False)[:, :, t.keep[0], t.keep[1]]
            y = y.to(weight.dtype)
            if pooled is None:
                pooled = y.amax(dim=(2, 3))
                cams = y.new_empty((y.shape[0], weight.shape[0], *size))
            else:
                pooled = torch.maximum(pooled, y.amax(dim=(2, 3)))
            maps = torch.einsum("bchw,kc->bkhw", y, weight)
            cams[:, :, t.out[0], t.out[1]] = maps + bias.reshape(1, -1, 1, 1)
        logits = model.fc(pooled)
    return logits, cams


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
    the fewest tiles.

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


def _out_channels(stages: Sequence[nn.Module]) -> int:
    for stage in reversed(stages):
        convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
        if convs:
            return int(convs[-1].out_channels)
    return 3
