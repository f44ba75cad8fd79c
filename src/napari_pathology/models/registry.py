"""One registry of models: the families' builders, the named specs and the shipped weights.

A *family* has one builder, a function ``builder(**config) -> nn.Module``
returning logits ``(B, n_classes)``; a *name* is a spec of a family. Both are
registered with :func:`register_model` (timm style)::

    @register_model(ModelSpec(name="my-model", family="mine", ...))
    def build_mine(**config) -> nn.Module: ...

This module only registers and looks up. The rest of the model API lives
beside it, as in timm (``_registry``, ``_factory``/``_builder``,
``_pretrained``), and is re-exported here so that
``from napari_pathology.models.registry import X`` keeps working:

- :mod:`napari_pathology.models.spec`: :class:`ModelSpec`, :class:`ModelError`;
- :mod:`napari_pathology.models.factory`: :class:`PathologyModel`,
  :func:`create_model`, :func:`load_checkpoint`, :func:`resolve_model`;
- :mod:`napari_pathology.models.checkpoint`: :func:`save_checkpoint`,
  :func:`checkpoint_info`, digests and the refusal of pickled code
  (:func:`load_untrusted`).

No Qt, no napari.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from napari_pathology.models.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_SUFFIXES,  # noqa: F401  (re-exported, as before the split)
    CHECKPOINT_VERSION,
    checkpoint_info,
    load_untrusted,
    read_checkpoint,
    refused_as_code,
    save_checkpoint,
    save_torch_file,
    tensors_digest,
)
from napari_pathology.models.spec import AGGREGATORS, OUTPUTS, ModelError, ModelSpec

if TYPE_CHECKING:
    from napari_pathology.models.factory import PathologyModel, create_model, load_checkpoint, resolve_model

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
    "load_untrusted",
    "pretrained_path",
    "refused_as_code",
    "register_family",
    "register_model",
    "register_pretrained",
    "register_spec",
    "resolve_model",
    "save_checkpoint",
    "save_torch_file",
    "tensors_digest",
]

#: Names defined in :mod:`napari_pathology.models.factory` (which imports this module),
#: re-exported lazily so that importing either module first works.
_FACTORY_NAMES = frozenset({"PathologyModel", "create_model", "load_checkpoint", "resolve_model"})

Builder = Callable[..., nn.Module]

_REGISTERED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


_LOCK = threading.RLock()
_BUILDERS: dict[str, Builder] = {}
_SPECS: dict[str, ModelSpec] = {}
_PRETRAINED: dict[str, Path] = {}


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    key = lambda f: (getattr(f, "__module__", None), getattr(f, "__qualname__", None))  # noqa: E731
    return a is b or key(a) == key(b)


def register_family(family: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(**config) -> nn.Module`` for a family.

    Registering the same function again (e.g. on module reload) is fine; a
    different builder for a taken family raises :class:`ModelError`.
    """
    if not isinstance(family, str) or not family.strip():
        raise ModelError(f"a model family needs a non-empty name, got {family!r}")

    def decorator(builder: Builder) -> Builder:
        if not callable(builder):
            raise ModelError(f"the builder of family {family!r} must be callable")
        with _LOCK:
            known = _BUILDERS.get(family)
            if known is not None and not _same_function(known, builder):
                raise ModelError(
                    f"model family {family!r} is already registered "
                    f"by {known.__module__}.{known.__qualname__}"
                )
            _BUILDERS[family] = builder
        return builder

    return decorator


def register_spec(spec: ModelSpec) -> ModelSpec:
    """Register a named spec of an already registered family (returns it)."""
    if not isinstance(spec, ModelSpec):
        raise ModelError(f"register_spec needs a ModelSpec, got {type(spec).__name__}")
    if not _REGISTERED_NAME.match(spec.name):
        raise ModelError(
            f"registered model names use letters, digits, '-' and '_' only (no dots or spaces): {spec.name!r}"
        )
    with _LOCK:
        if spec.family not in _BUILDERS:
            raise ModelError(f"model {spec.name!r}: family {spec.family!r} has no registered builder")
        known = _SPECS.get(spec.name)
        if known is not None and known != spec:
            raise ModelError(f"a different model named {spec.name!r} is already registered")
        _SPECS[spec.name] = spec
    return spec


def register_model(spec: ModelSpec) -> Callable[[Builder], Builder]:
    """Decorator registering a builder for ``spec.family`` and ``spec`` under ``spec.name``.

    Stack it to register several names of one family with the same builder.

    Examples
    --------
    >>> @register_model(ModelSpec("tiny-demo", "tiny-demo", "demo", ("a", "b"), 8, 1.0))  # doctest: +SKIP
    ... def build_tiny(**config):
    ...     return nn.Sequential(nn.Flatten(), nn.LazyLinear(2))

    """
    if not isinstance(spec, ModelSpec):
        raise ModelError(f"register_model needs a ModelSpec, got {type(spec).__name__}")

    def decorator(builder: Builder) -> Builder:
        register_family(spec.family)(builder)
        register_spec(spec)
        return builder

    return decorator


def register_pretrained(path: str | os.PathLike[str], name: str | None = None) -> ModelSpec | None:
    """Register a checkpoint file under its spec's name (or ``name``): ``create_model`` then loads it.

    Used for weights shipped with the package. A missing or unreadable file
    is skipped with a warning (returns None), so one broken file never hides
    the other models.
    """
    import logging

    path = Path(path)
    try:
        _, _, spec = read_checkpoint(path)
    except (ModelError, OSError) as error:
        logging.getLogger(__name__).warning("pretrained model %s not registered: %s", path, error)
        return None
    if name is not None:
        spec = spec.replace(name=name)
    with _LOCK:
        if spec.family not in _BUILDERS:
            logging.getLogger(__name__).warning(
                "pretrained model %s not registered: family %r unknown", path, spec.family
            )
            return None
        _SPECS[spec.name] = spec
        _PRETRAINED[spec.name] = path
    return spec


def pretrained_path(name: str) -> Path | None:
    """The checkpoint behind a registered pretrained name, or None for a builder-only name."""
    with _LOCK:
        return _PRETRAINED.get(name)


def list_models() -> list[ModelSpec]:
    """Every registered spec, sorted by name (families installed since the first import included)."""
    from napari_pathology.families import load_families

    load_families()
    with _LOCK:
        return [_SPECS[name] for name in sorted(_SPECS)]


def list_families() -> list[str]:
    """Every registered family, sorted."""
    with _LOCK:
        return sorted(_BUILDERS)


def get_spec(name: str) -> ModelSpec:
    """The registered spec called ``name``; :class:`ModelError` listing the names when unknown."""
    with _LOCK:
        spec = _SPECS.get(name)
    if spec is None:  # perhaps a model of a family installed since the registry was imported
        from napari_pathology.families import load_families

        load_families()
    with _LOCK:
        spec = _SPECS.get(name)
        available = sorted(_SPECS)
    if spec is None:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(available) or '(none)'}")
    return spec


def __getattr__(name: str) -> Any:
    if name in _FACTORY_NAMES:
        from napari_pathology.models import factory

        return getattr(factory, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
