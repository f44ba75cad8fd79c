"""Inception v3 at any width: torchvision's network with a depth multiplier.

Liu et al. 2017 found that an Inception v3 with fewer filters per layer
("depth multiplier", ~3% of the parameters) detects metastases as well as
the full network. torchvision has no width option, but its ``Inception3``
builds every convolution through one ``conv_block`` factory; passing a
factory that divides every channel count by the same factor gives exactly
that slimmer network, with torchvision's own blocks, wiring and
initialisation. Every channel count of Inception v3 is divisible by 8, so
depth multipliers 1, 1/2, 1/4 and 1/8 keep the concatenations consistent.

ImageNet weights are used only when torchvision already has them in its
cache (``torch.hub.get_dir()/checkpoints``); nothing is downloaded.

No Qt, no napari.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_pathology._native import import_torchvision

# triton before torchvision: see napari_pathology._native
tv_inception = import_torchvision("torchvision.models.inception")

__all__ = [
    "DEPTH_MULTIPLIERS",
    "InceptionClassifier",
    "cached_imagenet_weights",
    "inception_trunk",
]

log = logging.getLogger(__name__)

#: Widths that keep every Inception v3 channel count an integer.
DEPTH_MULTIPLIERS = (1.0, 0.5, 0.25, 0.125)
_FULL_FEATURES = 2048


def _scaled_conv_block(multiplier: Fraction) -> Any:
    """A ``BasicConv2d`` factory whose channel counts are scaled by ``multiplier`` (RGB input kept)."""

    def scale(channels: int) -> int:
        scaled = channels * multiplier
        if scaled.denominator != 1 or scaled < 1:
            raise ValueError(f"depth multiplier {float(multiplier)} does not divide {channels} channels")
        return int(scaled)

    def conv_block(in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
        in_scaled = in_channels if in_channels == 3 else scale(in_channels)
        return tv_inception.BasicConv2d(in_scaled, scale(out_channels), **kwargs)

    return conv_block


def cached_imagenet_weights() -> Path | None:
    """Path of torchvision's Inception v3 ImageNet weights if already cached locally, else None."""
    url = tv_inception.Inception_V3_Weights.IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    return path if path.is_file() else None


def inception_trunk(depth_multiplier: float = 1.0, imagenet: bool = False) -> tuple[nn.Module, int, str]:
    """Inception v3 without its classifier: ``(B, 3, H, W)`` -> pooled ``(B, features)``.

    Parameters
    ----------
    depth_multiplier : float
        One of :data:`DEPTH_MULTIPLIERS` (1 = torchvision's network).
    imagenet : bool
        Start from ImageNet weights if torchvision has them cached (only for
        ``depth_multiplier=1``); otherwise random initialisation.

    Returns
    -------
    trunk : nn.Module
        The network with ``fc`` replaced by identity and no auxiliary head.
    n_features : int
        Width of the pooled feature (2048 x multiplier).
    init : str
        How it was initialised, for logs and checkpoints.

    """
    multiplier = Fraction(float(depth_multiplier)).limit_denominator(64)
    if float(multiplier) not in DEPTH_MULTIPLIERS:
        raise ValueError(
            f"depth_multiplier must be one of {', '.join(str(m) for m in DEPTH_MULTIPLIERS)}, "
            f"got {depth_multiplier}"
        )
    conv_block = _scaled_conv_block(multiplier)
    blocks = [conv_block] + [
        partial(block, conv_block=conv_block)
        for block in (
            tv_inception.InceptionA,
            tv_inception.InceptionB,
            tv_inception.InceptionC,
            tv_inception.InceptionD,
            tv_inception.InceptionE,
            tv_inception.InceptionAux,
        )
    ]
    trunk = tv_inception.Inception3(
        num_classes=1000, aux_logits=False, transform_input=False, inception_blocks=blocks, init_weights=True
    )
    init = "random initialisation"
    if imagenet:
        weights = cached_imagenet_weights() if multiplier == 1 else None
        if weights is None:
            reason = (
                "only the full-width network has ImageNet weights"
                if multiplier != 1
                else "torchvision's ImageNet weights are not cached on this machine (nothing is downloaded)"
            )
            log.warning("Inception v3: %s; using random initialisation", reason)
            init = f"random initialisation ({reason})"
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
            trunk.load_state_dict(state)
            init = f"ImageNet weights from {weights.name}"
    trunk.fc = nn.Identity()
    return trunk, int(_FULL_FEATURES * multiplier), init


class InceptionClassifier(nn.Module):
    """Inception v3 (any width) with a dropout + linear head.

    Parameters
    ----------
    num_classes : int
        Output logits.
    depth_multiplier : float
        Width of the network (see :func:`inception_trunk`).
    dropout : float
        Dropout before the linear head.
    imagenet : bool
        Start from cached ImageNet weights where possible.

    Examples
    --------
    >>> net = InceptionClassifier(2, depth_multiplier=0.125)
    >>> net.eval()(torch.zeros(1, 3, 299, 299)).shape
    torch.Size([1, 2])

    """

    def __init__(
        self,
        num_classes: int = 2,
        depth_multiplier: float = 1.0,
        dropout: float = 0.2,
        imagenet: bool = False,
    ) -> None:
        super().__init__()
        self.trunk, self.n_features, self.init = inception_trunk(depth_multiplier, imagenet)
        self.trunk.dropout = nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.n_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, n_features)``."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.head(self.dropout(self.features(x)))
