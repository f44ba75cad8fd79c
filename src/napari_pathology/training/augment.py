"""Liu et al. 2017's patch augmentations, on batches of uint8 patches.

Per patch: a random crop of ``size`` from a patch read ``2 * jitter`` px
larger (translation jitter up to ``jitter`` px), one of the 8 dihedral
orientations, brightness delta up to 64/255, saturation factor 1 +/- 0.25,
hue shift up to 0.04 and contrast factor 1 +/- 0.75 (TensorFlow's
``random_*`` ranges), in random order of the colour operations as in the
paper's Inception preprocessing; values clipped to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from napari_pathology._native import import_torchvision
from napari_pathology.tiles import dihedral

TF = import_torchvision("torchvision.transforms.v2.functional")  # triton first: see napari_pathology._native

__all__ = ["Augmentation", "augment_batch"]


@dataclass(frozen=True)
class Augmentation:
    """Augmentation strengths (Liu et al. 2017 defaults); zero disables one."""

    jitter: int = 8
    dihedral: bool = True
    brightness: float = 64.0 / 255.0
    saturation: float = 0.25
    hue: float = 0.04
    contrast: float = 0.75

    @classmethod
    def none(cls) -> Augmentation:
        """No augmentation (centre crop, original colours)."""
        return cls(0, False, 0.0, 0.0, 0.0, 0.0)


def augment_batch(
    patches: np.ndarray, size: int, rng: np.random.Generator, aug: Augmentation | None = None
) -> torch.Tensor:
    """Augmented ``(B, 3, size, size)`` float batch in [0, 1] from ``(B, H, W, 3)`` uint8 patches.

    Patches larger than ``size`` are cropped at a random offset within
    ``aug.jitter`` of the centre (centre crop without jitter).
    """
    aug = aug or Augmentation()
    patches = np.asarray(patches)
    n, h, w = patches.shape[:3]
    out = torch.empty((n, 3, size, size), dtype=torch.float32)
    for i in range(n):
        cy, cx = (h - size) // 2, (w - size) // 2
        if aug.jitter > 0:
            cy = int(np.clip(cy + rng.integers(-aug.jitter, aug.jitter + 1), 0, h - size))
            cx = int(np.clip(cx + rng.integers(-aug.jitter, aug.jitter + 1), 0, w - size))
        crop = np.ascontiguousarray(patches[i, cy : cy + size, cx : cx + size])
        x = torch.from_numpy(crop).permute(2, 0, 1).float().div_(255.0)
        if aug.dihedral:
            x = dihedral(x, int(rng.integers(8)))
        out[i] = _colour(x, rng, aug)
    return out


def _colour(x: torch.Tensor, rng: np.random.Generator, aug: Augmentation) -> torch.Tensor:
    ops = []
    if aug.brightness > 0:
        ops.append(lambda t: t + float(rng.uniform(-aug.brightness, aug.brightness)))
    if aug.saturation > 0:
        ops.append(
            lambda t: TF.adjust_saturation(t, float(rng.uniform(1 - aug.saturation, 1 + aug.saturation)))
        )
    if aug.hue > 0:
        ops.append(lambda t: TF.adjust_hue(t.clamp(0, 1), float(rng.uniform(-aug.hue, aug.hue))))
    if aug.contrast > 0:
        ops.append(lambda t: TF.adjust_contrast(t, float(rng.uniform(1 - aug.contrast, 1 + aug.contrast))))
    for k in rng.permutation(len(ops)):
        x = ops[k](x)
    return x.clamp_(0.0, 1.0)
