"""``metastasis``: Liu et al. 2017's Inception v3 metastasis detector.

A patch of 299 x 299 px is labelled by its centre 128 x 128 px (tumour if
any of it is tumour); inference slides with stride 128, averages the 8
dihedral orientations and keeps one heatmap value per stride; the slide
score is the heatmap maximum and detections come from non-maximum
suppression. Pixels are scaled to [-1, 1].

Two widths are registered: the full network (torchvision's Inception v3)
and a *small* one with 1/8 of the filters per layer (~1.6% of the
parameters; the paper's depth-multiplier variant), which is the one that
runs well on a CPU. Each comes at 40x (0.25 um/px), 20x (0.5) and 10x (1.0).
These registered names are untrained starting points for training; the
trained demo weights ship as ``metastasis`` (see :mod:`.pretrained`).
"""

from __future__ import annotations

from napari_pathology.models.inception import InceptionClassifier
from napari_pathology.models.registry import ModelSpec, register_family, register_spec

__all__ = ["SMALL_DEPTH_MULTIPLIER", "build_metastasis", "metastasis_spec"]

#: Width of the small network (1/8 of Inception v3's filters; ~345k parameters).
SMALL_DEPTH_MULTIPLIER = 0.125
MAGNIFICATIONS = {"40x": 0.25, "20x": 0.5, "10x": 1.0}


@register_family("metastasis")
def build_metastasis(
    num_classes: int = 2, depth_multiplier: float = 1.0, dropout: float = 0.5, imagenet: bool = False
) -> InceptionClassifier:
    """Builder of the ``metastasis`` family: an Inception v3 classifier of any width."""
    return InceptionClassifier(num_classes, depth_multiplier, dropout, imagenet)


def metastasis_spec(
    name: str, mpp: float, depth_multiplier: float = 1.0, imagenet: bool = False
) -> ModelSpec:
    """A metastasis detector spec: 299 px input, centre 128, stride 128, 8-way TTA, max aggregator."""
    width = "small (1/8 width)" if depth_multiplier < 1 else "full"
    return ModelSpec(
        name=name,
        family="metastasis",
        task="metastasis detection",
        classes=("normal", "tumour"),
        input_size=299,
        mpp=mpp,
        centre_size=128,
        stride=128,
        normalization="liu",
        output="heatmap",
        aggregator="max",
        positive_class="tumour",
        tta=True,
        description=(
            f"Liu et al. 2017 Inception v3, {width}, {mpp:g} um/px; untrained starting point "
            f"({'ImageNet weights when cached' if imagenet else 'random initialisation'}) - "
            "train it or load weights"
        ),
        config={"depth_multiplier": depth_multiplier, "dropout": 0.5, "imagenet": imagenet},
    )


for _mag, _mpp in MAGNIFICATIONS.items():
    _suffix = "" if _mag == "40x" else f"-{_mag}"
    register_spec(metastasis_spec(f"metastasis-inception-v3{_suffix}", _mpp, 1.0, imagenet=True))
    register_spec(metastasis_spec(f"metastasis-small{_suffix}", _mpp, SMALL_DEPTH_MULTIPLIER))
