"""Tiles to normalised tensors, and the eight dihedral orientations for test-time augmentation.

torch is imported inside the functions, so importing this module does not import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATIONS",
    "dihedral",
    "normalize_uint8",
    "normalize_unit",
    "to_tensor",
    "tta_mean",
]

#: Input normalisations a model can declare (see :func:`to_tensor`).
NORMALIZATIONS = ("imagenet", "liu", "unit")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(tiles: np.ndarray, normalization: str, device: Any = None) -> torch.Tensor:
    """Batch of RGB uint8 tiles to a normalised ``(B, 3, H, W)`` float32 tensor.

    Parameters
    ----------
    tiles : ndarray
        ``(B, H, W, 3)`` (or one ``(H, W, 3)`` tile) with values 0-255.
    normalization : {"imagenet", "liu", "unit"}
        ``imagenet``: ``(x / 255 - mean) / std`` with ImageNet statistics;
        ``liu``: ``x / 127.5 - 1`` in [-1, 1] (Liu et al. 2017);
        ``unit``: ``x / 255`` in [0, 1].
    device : str or torch.device, optional
        Move the uint8 batch there first (4x less to transfer than float).

    Returns
    -------
    torch.Tensor

    """
    import torch

    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r} (known: {', '.join(NORMALIZATIONS)})")
    array = np.asarray(tiles)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"tiles must be (B, H, W, 3) RGB, got shape {array.shape}")
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # torch warns on read-only memory
        array = array.copy()
    x = torch.from_numpy(array)
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return normalize_unit(x.div_(255.0), normalization)


def normalize_uint8(x: torch.Tensor, normalization: str) -> torch.Tensor:
    """A uint8 ``(B, 3, H, W)`` tensor as the network's normalised float input, on its own device.

    For images kept as uint8 until each crop is cut (a whole slide run tile by tile).
    """
    return normalize_unit(x.float().div_(255.0), normalization)


def normalize_unit(x: torch.Tensor, normalization: str) -> torch.Tensor:
    """Normalise a float ``(B, 3, H, W)`` batch in [0, 1] (in place) as a model expects."""
    import torch

    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r} (known: {', '.join(NORMALIZATIONS)})")
    if normalization == "unit":
        return x
    if normalization == "liu":
        return x.mul_(2.0).sub_(1.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 orientations of ``x`` (last two dims).

    Rotates by 90 degrees ``k % 4`` times (``torch.rot90``), then flips the
    last dimension if ``k >= 4``; ``k = 0`` returns ``x`` itself.
    """
    import torch

    if not 0 <= int(k) < 8:
        raise ValueError(f"dihedral orientation must be in 0..7, got {k!r}")
    k = int(k)
    out = torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x
    return torch.flip(out, dims=(-1,)) if k >= 4 else out


def tta_mean(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean of ``fn`` over the 8 dihedral orientations of ``x`` (Liu et al.'s test-time augmentation).

    ``fn`` must return per-tile outputs without spatial dimensions (e.g.
    ``(B, n_classes)`` probabilities), which need no inverse transform.
    One orientation is evaluated at a time, so memory stays that of one call.
    """
    total = None
    for k in range(8):
        out = fn(dihedral(x, k))
        total = out.clone() if total is None else total.add_(out)
    assert total is not None
    return total / 8.0
