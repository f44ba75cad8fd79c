"""``nuclear-density``: a baseline tumour scorer, not a trained model.

It exists so the inference engine, the Analyze panel and the CLI can be
built, tested and demonstrated end to end on a CPU without downloading
weights. It measures how much of a tile is covered by *large* hematoxylin-
dark objects (nuclei) and maps that density to a tumour probability with an
affine (logistic) head.

How it scores a tile (``NuclearDensityNet``)
--------------------------------------------
1. Optical density per pixel, ``OD = -log((255 x + 1) / 256)`` (input
   normalisation ``"unit"``, x in [0, 1]).
2. Hematoxylin amount: a 1x1 convolution with the hematoxylin row of
   Ruifrok & Johnston's H&E-DAB colour-deconvolution matrix
   (``skimage.color.hed_from_rgb[:, 0]``), minus ``threshold``.
3. Morphological opening (min- then max-pool, ``opening_px`` wide, ~6 um):
   keeps nuclei at least that wide, removes small dark ones (lymphocytes,
   fibroblasts) unless they touch.
4. Soft threshold, ``sigmoid(sharpness * h)``, averaged over the tile: the
   *nuclear density*, the fraction of the tile covered by large nuclei.
5. Tumour log-odds ``z = slope * density + bias`` (a learnable
   ``nn.Linear(1, 1)``), logits ``[-z/2, z/2]`` for ("normal", "tumour").

All steps are parameters or buffers of a real ``nn.Module`` (saved in
checkpoints; the stain vector, sharpness and head can be fine-tuned).

Defaults were tuned on four synthetic slides (``napari_pathology.slide.synthetic``,
0.5 um/px, seeds 3, 5, 7, 11): tiles fully inside tumour score 0.5-0.95
(median ~0.95), stroma, fat, glands and background below 0.02.

Known weaknesses (this is a baseline)
-------------------------------------
- Dense lymphoid aggregates light up: packed lymphocytes merge into
  "large" objects after the opening. Their tiles score up to ~0.4 with
  ``nuclear-density`` (2 um/px) and ~0.2 with ``nuclear-density-fine``
  (1 um/px, which resolves them better); denser or darker aggregates on
  real slides can pass 0.5.
- Anything hematoxylin-coloured counts: green or blue pen ink scores ~1.0,
  as would folds, dirt or heavily stained mucin. Exclude ink with the
  tissue mask.
- It knows nothing of morphology beyond size and density: no nucleoli, no
  architecture, no atypia. Tumour with sparse or small nuclei scores low;
  cellular benign tissue scores high.
- Stain strength shifts the scores (no stain normalisation).

Use it for plumbing, demos and as the floor any trained model must beat.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from napari_pathology.models.registry import ModelSpec, register_model

__all__ = ["FINE_SPEC", "HEMATOXYLIN_FROM_OD", "SPEC", "NuclearDensityNet", "build_nuclear_density"]

#: Hematoxylin row of the H&E-DAB colour-deconvolution matrix (Ruifrok & Johnston
#: 2001), i.e. ``skimage.color.hed_from_rgb[:, 0]``: weights on the R, G, B optical densities.
HEMATOXYLIN_FROM_OD = (1.87798274, -0.06590806, -0.60190736)

_DESCRIPTION = (
    "Baseline, not a trained model: density of large hematoxylin-dark nuclei per tile. "
    "For testing and demos; lymphoid aggregates and blue ink score high too."
)


class NuclearDensityNet(nn.Module):
    """Tumour log-odds from the density of large hematoxylin-dark objects.

    Parameters
    ----------
    opening_px : int
        Side (odd, px) of the morphological opening that removes nuclei
        narrower than it; 1 disables it. About 6 um is right for
        tumour-vs-lymphocyte nuclei.
    threshold : float
        Hematoxylin optical density above which a pixel counts as nuclear.
    sharpness : float
        Slope of the soft threshold (per unit of optical density).
    slope, bias : float
        Initial head: tumour log-odds ``slope * density + bias``.
    stain : sequence of float
        Weights of the R, G, B optical densities giving the hematoxylin amount.

    Examples
    --------
    >>> net = NuclearDensityNet()
    >>> net(torch.ones(2, 3, 64, 64)).shape  # white tiles
    torch.Size([2, 2])

    """

    def __init__(
        self,
        opening_px: int = 5,
        threshold: float = 0.4,
        sharpness: float = 10.0,
        slope: float = 15.0,
        bias: float = -6.3,
        stain: tuple[float, float, float] | list[float] = HEMATOXYLIN_FROM_OD,
    ) -> None:
        super().__init__()
        opening_px = int(opening_px)
        if opening_px < 1 or opening_px % 2 == 0:
            raise ValueError(f"opening_px must be a positive odd number, got {opening_px}")
        if len(stain) != 3:
            raise ValueError(f"stain must have 3 weights (R, G, B optical density), got {stain!r}")
        self.opening_px = opening_px
        self.stain = nn.Conv2d(3, 1, kernel_size=1)
        self.sharpness = nn.Parameter(torch.tensor(float(sharpness)))
        self.head = nn.Linear(1, 1)
        with torch.no_grad():
            self.stain.weight.copy_(torch.tensor([float(v) for v in stain]).view(1, 3, 1, 1))
            self.stain.bias.fill_(-float(threshold))
            self.head.weight.fill_(float(slope))
            self.head.bias.fill_(float(bias))

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """Fraction ``(B, 1)`` of each tile covered by large nuclei (soft), for ``x`` in [0, 1]."""
        od = -torch.log((x.clamp(0.0, 1.0) * 255.0 + 1.0) / 256.0)
        h = self.stain(od)
        if self.opening_px > 1:
            k, pad = self.opening_px, self.opening_px // 2
            h = -F.max_pool2d(-h, k, stride=1, padding=pad)  # erosion
            h = F.max_pool2d(h, k, stride=1, padding=pad)  # dilation
        return torch.sigmoid(self.sharpness * h).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 2)`` for ("normal", "tumour") from a ``(B, 3, H, W)`` batch in [0, 1]."""
        z = self.head(self.density(x))
        return torch.cat([-0.5 * z, 0.5 * z], dim=1)


SPEC = ModelSpec(
    name="nuclear-density",
    family="baseline",
    task="tumour detection (baseline)",
    classes=("normal", "tumour"),
    input_size=64,
    mpp=2.0,
    centre_size=None,
    stride=64,
    normalization="unit",
    output="heatmap",
    aggregator="max",
    positive_class="tumour",
    tta=True,
    description=_DESCRIPTION,
    config={"opening_px": 5, "threshold": 0.4, "sharpness": 10.0, "slope": 15.0, "bias": -6.3},
)

FINE_SPEC = SPEC.replace(
    name="nuclear-density-fine",
    input_size=128,
    mpp=1.0,
    stride=128,
    description=_DESCRIPTION + " Finer variant: 128 px at 1 um/px.",
    config={"opening_px": 7, "threshold": 0.4, "sharpness": 10.0, "slope": 15.0, "bias": -5.4},
)


@register_model(FINE_SPEC)
@register_model(SPEC)
def build_nuclear_density(**config: Any) -> NuclearDensityNet:
    """Builder of the ``baseline`` family (keyword arguments of :class:`NuclearDensityNet`)."""
    return NuclearDensityNet(**config)
