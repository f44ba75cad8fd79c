"""What looks at pixels: one registry of models, checkpoints, model families (torch, no Qt).

Importing this package registers the built-in families (each module's
``@register_model`` runs on import); list them with :func:`list_models`.
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

# Built-in families: imported for their registration side effect.
from napari_pathology.models import baseline, metastasis, nucleus_purity, tumor_normal  # noqa: F401  isort: skip
from napari_pathology.models.pretrained import register_shipped_weights  # isort: skip

register_shipped_weights()

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
