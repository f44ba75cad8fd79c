"""The tumour/normal family's encoder: the frozen Inception v3 trunk of a tile model.

Noorbakhsh et al. 2020 train their head on features of a frozen trunk. This
module registers that trunk as the encoder ``tumor-normal-trunk``: its
weights are a checkpoint (or registered name) of any model whose network has
an Inception ``trunk`` (a tumour/normal model, or a metastasis detector whose
trunk was trained on slides); by default the shipped tumour/normal demo
model. The tile size, um/px and normalisation are the model's.

No Qt, no napari.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from napari_pathology.features import Encoder, EncoderError, register_encoder
from napari_pathology.models.registry import ModelError, PathologyModel, pretrained_path

__all__ = ["ENCODER", "trunk_encoder"]

log = logging.getLogger(__name__)

#: Name of the family's encoder.
ENCODER = "tumor-normal-trunk"
#: The shipped model whose trunk is the default.
_DEFAULT_MODEL = "tumor-normal"
#: The model built when no trained one is found (random trunk).
_UNTRAINED_MODEL = "tumor-normal-small-10x"


def trunk_encoder(model: PathologyModel, *, trained: bool = True, source: str | None = None) -> Encoder:
    """The frozen trunk of ``model`` as an :class:`Encoder` (sharing the model's trunk module).

    Parameters
    ----------
    model : PathologyModel
        A model whose ``net`` has ``trunk`` and ``n_features``.
    trained : bool
        Whether the trunk's weights are trained.
    source : str, optional
        Where they came from (default: the model's name).

    Raises
    ------
    EncoderError
        When the model has no trunk.
    """
    trunk = getattr(model.net, "trunk", None)
    if trunk is None or not hasattr(model.net, "n_features"):
        raise EncoderError(
            f"{model.spec.name!r} ({model.spec.family}) has no Inception trunk to use as encoder {ENCODER!r}"
        )
    spec = model.spec
    return Encoder(
        ENCODER, trunk, int(model.net.n_features), int(spec.input_size), float(spec.mpp), spec.normalization,
        trained=trained,
        provenance={"weights": source or spec.name, "model": spec.name, "model_family": spec.family},
    )  # fmt: skip


def _build(weights: Any = None) -> Encoder:
    from napari_pathology.models import create_model, resolve_model

    if weights is None:
        log.warning(
            "encoder %s: no trained model found (the shipped %r is missing) and none given; "
            "its trunk is UNTRAINED (random initialisation)", ENCODER, _DEFAULT_MODEL,
        )  # fmt: skip
        return trunk_encoder(create_model(_UNTRAINED_MODEL), trained=False, source=None)
    try:
        model = resolve_model(str(weights) if isinstance(weights, Path) else weights)
    except ModelError as error:
        raise EncoderError(f"encoder {ENCODER}: {error}") from None
    return trunk_encoder(model, trained=True, source=str(weights))


def _find() -> str | None:
    return _DEFAULT_MODEL if pretrained_path(_DEFAULT_MODEL) is not None else None


register_encoder(
    ENCODER,
    _build,
    dim=None,
    patch_size=None,
    mpp=None,
    normalization="liu",
    description=(
        "frozen Inception v3 trunk of a tumour/normal or metastasis model (Noorbakhsh et al. 2020); "
        "--weights: a checkpoint or model name"
    ),
    find_weights=_find,
)
