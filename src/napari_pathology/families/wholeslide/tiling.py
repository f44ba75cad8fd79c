"""Which input crop each tile of an exact tiled pass needs: a network's receptive spans, sizes and stride.

:func:`geometry` reads the spatial layers of a network (convolutions, max
pooling, torchvision's ResNet blocks; per-pixel layers pass through) and
:class:`Geometry` computes, exactly, which input indices (padding
included) a range of outputs reads, the output size of an input and the
total stride. :func:`plan_tiles` cuts the output grid into tiles and gives
each its input crop: starting at a multiple of the total stride (so strided
layers sample the same positions as in the full pass) and covering the
receptive field of the outputs it keeps, clipped to the image (so the
padding the layers see at the image's own edge is the full pass's). See
:mod:`.streaming`. No Qt, no napari.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["Geometry", "Tile", "TileSize", "geometry", "plan_tiles"]

#: Layers that act on each pixel alone (no spatial extent): they pass spans and sizes through.
_POINTWISE = (nn.ReLU, nn.Identity, nn.Dropout, nn.BatchNorm2d, nn.SiLU, nn.GELU)


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
