"""``tumor-normal``: Noorbakhsh et al. 2020's tile classifier and its tumour-predicted fraction.

A frozen Inception v3 turns each tile (512 x 512 px at 20x in the paper)
into a pooled feature vector; a head of FC 1024 + ReLU + dropout 0.2 +
linear gives class logits (tumour/normal, or subtypes). Trained from
slide-level labels on cached features (see
:mod:`napari_pathology.families.tumor_normal.train`). The slide score is the
**TPF**, the fraction of tissue tiles whose most likely class is tumour (the
engine's ``fraction`` aggregator); the heatmap shows tile probabilities.

The trunk is frozen: it stays in eval mode (batch-norm statistics fixed)
and its parameters need no gradients, so fine-tuning touches the head only.
"""

from __future__ import annotations

import torch
from torch import nn

from napari_pathology.models.inception import inception_trunk
from napari_pathology.models.registry import ModelSpec, register_family, register_spec

__all__ = ["TumorNormalNet", "build_tumor_normal", "tumor_normal_spec"]


class TumorNormalNet(nn.Module):
    """Frozen Inception v3 features and a trainable FC head.

    Parameters
    ----------
    num_classes : int
        Output classes.
    depth_multiplier : float
        Width of the Inception v3 trunk.
    hidden : int
        Width of the hidden FC layer (1024 in the paper).
    dropout : float
        Dropout after the hidden layer (0.2 in the paper).
    imagenet : bool
        Start the trunk from cached ImageNet weights where possible.

    Examples
    --------
    >>> net = TumorNormalNet(2, depth_multiplier=0.125)
    >>> net(torch.zeros(1, 3, 128, 128)).shape
    torch.Size([1, 2])

    """

    def __init__(
        self,
        num_classes: int = 2,
        depth_multiplier: float = 1.0,
        hidden: int = 1024,
        dropout: float = 0.2,
        imagenet: bool = False,
    ) -> None:
        super().__init__()
        self.trunk, self.n_features, self.init = inception_trunk(depth_multiplier, imagenet)
        self.trunk.requires_grad_(False)
        self.trunk.eval()
        self.head = nn.Sequential(
            nn.Linear(self.n_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )  # fmt: skip

    def train(self, mode: bool = True) -> TumorNormalNet:
        """Set training mode for the head; the frozen trunk always stays in eval mode."""
        super().train(mode)
        self.trunk.eval()
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled trunk features ``(B, n_features)`` (no gradients)."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.head(self.features(x))


@register_family("tumor-normal")
def build_tumor_normal(
    num_classes: int = 2,
    depth_multiplier: float = 1.0,
    hidden: int = 1024,
    dropout: float = 0.2,
    imagenet: bool = False,
) -> TumorNormalNet:
    """Builder of the ``tumor-normal`` family (keyword arguments of :class:`TumorNormalNet`)."""
    return TumorNormalNet(num_classes, depth_multiplier, hidden, dropout, imagenet)


def tumor_normal_spec(
    name: str,
    *,
    mpp: float = 0.5,
    tile_size: int = 512,
    depth_multiplier: float = 1.0,
    imagenet: bool = True,
    classes: tuple[str, ...] = ("normal", "tumour"),
    description: str = "",
) -> ModelSpec:
    """A tumour/normal tile classifier spec: non-overlapping tiles, TPF (``fraction``) slide score."""
    return ModelSpec(
        name=name,
        family="tumor-normal",
        task="tumour/normal tiles (TPF)",
        classes=classes,
        input_size=tile_size,
        mpp=mpp,
        centre_size=None,
        stride=tile_size,
        normalization="liu",
        output="heatmap",
        aggregator="fraction",
        positive_class="tumour" if "tumour" in classes else None,
        tta=False,
        description=description
        or (
            f"Noorbakhsh et al. 2020 tile classifier, {tile_size} px at {mpp:g} um/px on frozen Inception v3 "
            "features; untrained head - train it on slide labels"
        ),
        config={"depth_multiplier": depth_multiplier, "hidden": 1024, "dropout": 0.2, "imagenet": imagenet},
    )


register_spec(tumor_normal_spec("tumor-normal-inception-v3"))
register_spec(
    tumor_normal_spec(
        "tumor-normal-small-10x",
        mpp=1.0,
        tile_size=256,
        depth_multiplier=0.125,
        imagenet=False,
        description=(
            "Noorbakhsh et al. 2020 tile classifier on a small (1/8 width) Inception v3 trunk, 256 px at "
            "1 um/px (the paper's 512 px at 20x field of view); give it a trained trunk (e.g. a metastasis "
            "checkpoint) and train the head on slide labels"
        ),
    )
)
