"""What looks at pixels: one registry of models and checkpoints (torch, no Qt).

Importing this package registers the model families
(:mod:`napari_pathology.families`: the built-in ones and any installed
through the ``napari_pathology.families`` entry points) with their specs
and demo weights; list them with :func:`list_models`.

Layout (as timm's ``_registry``/``_factory``/``_builder``/``_pretrained``):
:mod:`~napari_pathology.models.spec` (what a model is),
:mod:`~napari_pathology.models.registry` (families, names, shipped weights),
:mod:`~napari_pathology.models.factory` (building models, by name or from a
checkpoint) and :mod:`~napari_pathology.models.checkpoint` (the file format,
digests and safe reading).
"""

from napari_pathology.models.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    checkpoint_info,
    save_checkpoint,
)
from napari_pathology.models.factory import PathologyModel, create_model, load_checkpoint, resolve_model
from napari_pathology.models.registry import (
    Builder,
    get_spec,
    list_families,
    list_models,
    pretrained_path,
    register_family,
    register_model,
    register_pretrained,
    register_spec,
)
from napari_pathology.models.spec import AGGREGATORS, OUTPUTS, ModelError, ModelSpec

from napari_pathology.families import load_families  # isort: skip

load_families()  # the families' builders, specs and demo weights

__all__ = [
    "AGGREGATORS",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "OUTPUTS",
    "Builder",
    "ModelError",
    "ModelSpec",
    "PathologyModel",
    "checkpoint_info",
    "create_model",
    "get_spec",
    "list_families",
    "list_models",
    "load_checkpoint",
    "pretrained_path",
    "register_family",
    "register_model",
    "register_pretrained",
    "register_spec",
    "resolve_model",
    "save_checkpoint",
]
