"""What looks at pixels: one registry of models and checkpoints (torch, no Qt).

Importing this package registers the model families
(:mod:`napari_pathology.families`: the built-in ones and any installed
through the ``napari_pathology.families`` entry points) with their specs
and demo weights; list them with :func:`list_models`.
"""

from napari_pathology.models.registry import (
    AGGREGATORS,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    OUTPUTS,
    Builder,
    ModelError,
    ModelSpec,
    PathologyModel,
    checkpoint_info,
    create_model,
    get_spec,
    list_families,
    list_models,
    load_checkpoint,
    pretrained_path,
    register_family,
    register_model,
    register_pretrained,
    register_spec,
    resolve_model,
    save_checkpoint,
)

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
