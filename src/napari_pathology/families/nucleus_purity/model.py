"""``nucleus-purity``: Noorbakhsh et al. 2020's nucleus classifier (after Hlavcheva et al.) for ROI purity.

One nucleus at a time: a square of ``context_um`` micrometres around its
centroid, resized to 32 x 32 px and histogram-equalised (see
:mod:`napari_pathology.nuclei.classify`), goes into a small CNN trained from
scratch (the paper found transfer learning with Inception on 128 px patches
worse, AUC < 0.65) that gives the tumour probability of the nucleus. The
predicted purity of a region is the mean tumour probability of its nuclei
(sum of probabilities / number of nuclei).

The paper names Hlavcheva et al.'s network without listing its layers; this
is a network of that kind, sized for a CPU: three blocks of 3 x 3
convolution, batch norm, ReLU and 2 x 2 max-pooling (``width``, 2 ``width``,
4 ``width`` filters; 32 -> 4 px), a dense layer of ``hidden`` units with
ReLU, dropout and the class logits. Dropout comes after the ReLU only: a
dropout in front of a ReLU layer makes its mean activation at inference
lower than in training, which shrank the logits and pulled the predicted
purity down (0.11-0.14 against a true 0.19 on an unseen synthetic slide,
0.18 with the dropout after the ReLU). ``context_um`` and
``equalize`` travel in the spec's config so a checkpoint reads its patches
the way it was trained; the spec's ``mpp`` is ``context_um / 32``, the
resolution the patches are read at.
"""

from __future__ import annotations

import math

from torch import nn

from napari_pathology.models.registry import ModelSpec, register_family, register_spec

__all__ = [
    "DEFAULT_CONTEXT_UM",
    "EQUALIZATIONS",
    "FAMILY",
    "INPUT_SIZE",
    "NucleusNet",
    "build_nucleus_purity",
    "nucleus_purity_spec",
]

FAMILY = "nucleus-purity"
#: Side of the square read around each nucleus centroid, um (a large tumour nucleus plus a rim).
DEFAULT_CONTEXT_UM = 16.0
#: Patch side in px (Noorbakhsh et al.: nucleus patches resized to 32 x 32).
INPUT_SIZE = 32
#: Histogram equalisation of a patch: each RGB channel on its own, the HSV value only, or none.
EQUALIZATIONS = ("channel", "luminance", "none")


class NucleusNet(nn.Module):
    """Small CNN trained from scratch on 32 x 32 nucleus patches.

    Parameters
    ----------
    num_classes : int
        Output classes.
    width : int
        Filters of the first convolution block (doubled by each of the next two).
    hidden : int
        Units of the dense layer.
    dropout : float
        Dropout after the dense layer's ReLU.

    Examples
    --------
    >>> import torch
    >>> NucleusNet()(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 2])

    """

    def __init__(self, num_classes: int = 2, width: int = 16, hidden: int = 64, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for k in range(3):
            out = width * 2**k
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * 16, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )  # fmt: skip

    def forward(self, x):  # noqa: D102 - logits (B, num_classes)
        return self.head(self.features(x))


@register_family(FAMILY)
def build_nucleus_purity(
    num_classes: int = 2,
    width: int = 16,
    hidden: int = 64,
    dropout: float = 0.5,
    context_um: float = DEFAULT_CONTEXT_UM,
    equalize: str = "channel",
) -> NucleusNet:
    """Builder of the ``nucleus-purity`` family.

    ``context_um`` and ``equalize`` describe the input (see
    :func:`napari_pathology.nuclei.classify.nucleus_patches`); they are checked
    here and kept on the network as attributes.
    """
    if isinstance(width, bool) or int(width) != width or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    if isinstance(hidden, bool) or int(hidden) != hidden or hidden < 1:
        raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not (isinstance(context_um, int | float) and math.isfinite(context_um) and context_um > 0):
        raise ValueError(f"context_um must be a positive number of micrometres, got {context_um!r}")
    if equalize not in EQUALIZATIONS:
        raise ValueError(f"equalize must be one of {', '.join(EQUALIZATIONS)}, got {equalize!r}")
    net = NucleusNet(num_classes, int(width), int(hidden), float(dropout))
    net.context_um, net.equalize = float(context_um), equalize
    net.init = "random initialisation (trained from scratch)"
    return net


def nucleus_purity_spec(
    name: str,
    *,
    context_um: float = DEFAULT_CONTEXT_UM,
    width: int = 16,
    hidden: int = 64,
    dropout: float = 0.5,
    equalize: str = "channel",
    description: str = "",
) -> ModelSpec:
    """A nucleus purity classifier spec: 32 px patches of ``context_um`` um, one probability per nucleus."""
    context_um = float(context_um)
    return ModelSpec(
        name=name,
        family=FAMILY,
        task="nucleus tumour/normal (ROI purity)",
        classes=("normal", "tumour"),
        input_size=INPUT_SIZE,
        mpp=context_um / INPUT_SIZE,
        normalization="liu",
        output="nuclei",
        aggregator="mean",
        positive_class="tumour",
        tta=True,
        description=description
        or (
            f"Noorbakhsh et al. 2020 nucleus classifier (after Hlavcheva et al.), {context_um:g} um nucleus "
            f"patches at 32 px, {equalize} histogram equalisation; untrained - train it on labelled nuclei"
        ),
        config=dict(width=width, hidden=hidden, dropout=dropout, context_um=context_um, equalize=equalize),
    )


register_spec(nucleus_purity_spec("nucleus-purity-cnn"))
