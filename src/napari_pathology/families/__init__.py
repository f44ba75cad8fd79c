"""Model families, one folder each, found by registration (no Qt).

The built-in families are listed in :data:`BUILTIN`; a third party adds one
by exposing a :class:`Family` instance (or a module with ``FAMILY``) under the
``napari_pathology.families`` entry-point group::

    [project.entry-points."napari_pathology.families"]
    my-family = "my_package.family:FAMILY"

Everything else (the CLI, the panels, the engine, the evaluation) asks this
registry: :func:`list_families`, :func:`get_family`, :func:`family_of`.
"""

from __future__ import annotations

import importlib
import logging
import threading
from importlib.metadata import entry_points
from typing import Any

from napari_pathology.families.base import (
    DATA_SOURCES,
    INPUT_KINDS,
    Family,
    SettingField,
    setting_fields,
)

__all__ = [
    "BUILTIN",
    "DATA_SOURCES",
    "ENTRY_POINT_GROUP",
    "INPUT_KINDS",
    "Family",
    "SettingField",
    "family_of",
    "get_family",
    "list_families",
    "load_families",
    "register",
    "setting_fields",
]

#: Modules of the built-in families; each defines ``FAMILY``.
BUILTIN = (
    "napari_pathology.families.metastasis",
    "napari_pathology.families.tumor_normal",
    "napari_pathology.families.nucleus_purity",
    "napari_pathology.families.baseline",
    "napari_pathology.families.clam",
    "napari_pathology.families.wholeslide",
)
ENTRY_POINT_GROUP = "napari_pathology.families"

_FAMILIES: dict[str, Family] = {}
_LOADED: set[str] = set()  # builtin modules and entry points already loaded (or refused)
_LOCK = threading.RLock()
#: Families whose shipped weights wait for their builders (see ``_register_weights``).
_PENDING_WEIGHTS: dict[str, Family] = {}
_log = logging.getLogger(__name__)


def register(family: Family) -> Family:
    """Register a family instance and its models (idempotent for the same instance's class)."""
    if not isinstance(family, Family):
        raise TypeError(f"register needs a Family instance, got {type(family).__name__}")
    if not family.name:
        raise ValueError(f"{type(family).__name__} has no name")
    if family.input_kind not in INPUT_KINDS:
        raise ValueError(f"family {family.name!r}: input kind {family.input_kind!r} not in {INPUT_KINDS}")
    unknown = set(family.data_sources) - set(DATA_SOURCES)
    if unknown:
        raise ValueError(f"family {family.name!r}: unknown data sources {sorted(unknown)}")
    with _LOCK:
        known = _FAMILIES.get(family.name)
        if known is not None:
            if type(known) is type(family):
                return known
            raise ValueError(f"a different family named {family.name!r} is already registered")
        _FAMILIES[family.name] = family
        try:
            family.register_models()
        except BaseException:
            del _FAMILIES[family.name]
            raise
        _register_weights(family)
    return family


def _register_weights(family: Family) -> None:
    """Register a family's shipped weights, or keep them pending while its builders are not in yet.

    A family module imported in the middle of the registry's own first import (say
    ``families.x.train`` imported before anything else) registers its builders only
    when that import finishes; :func:`load_families` registers the weights then.
    """
    from napari_pathology.models.pretrained import register_demo_weights
    from napari_pathology.models.registry import list_families as families_with_builders

    if family.demo_weights and family.name not in families_with_builders():
        _PENDING_WEIGHTS[family.name] = family
        return
    _PENDING_WEIGHTS.pop(family.name, None)
    register_demo_weights(dict(family.demo_weights))


def _family_in(obj: Any) -> Family:
    if isinstance(obj, Family):
        return obj
    if isinstance(obj, type) and issubclass(obj, Family):
        return obj()
    found = getattr(obj, "FAMILY", None)
    if isinstance(found, Family):
        return found
    raise TypeError(f"{obj!r} is not a Family, a Family class or a module with FAMILY")


def load_families() -> None:
    """Register the built-in families and every entry point not seen yet (cheap when nothing is new)."""
    import napari_pathology.models  # noqa: F401  (the registry first; its import calls this function)

    with _LOCK:
        for family in list(_PENDING_WEIGHTS.values()):
            _register_weights(family)
        for module in BUILTIN:
            if module not in _LOADED:
                _LOADED.add(module)
                register(_family_in(importlib.import_module(module)))
        for point in entry_points(group=ENTRY_POINT_GROUP):
            key = f"entry point {point.name} = {point.value}"
            if key in _LOADED:
                continue
            _LOADED.add(key)
            try:
                register(_family_in(point.load()))
            except Exception as error:  # a broken plug-in must not break the program
                _log.warning("model family from %s not registered: %s", key, error)


def list_families(*, trainable: bool | None = None) -> list[Family]:
    """Registered families by name (only those with a trainer when ``trainable``)."""
    load_families()
    found = [_FAMILIES[name] for name in sorted(_FAMILIES)]
    if trainable is not None:
        found = [f for f in found if f.trainable == trainable]
    return found


def get_family(name: str) -> Family:
    """The family called ``name``; KeyError listing the families when unknown."""
    load_families()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r} (known: {', '.join(sorted(_FAMILIES))})") from None


def family_of(spec: Any) -> Family:
    """The family of a model spec (or of a model, or a family name)."""
    spec = getattr(spec, "spec", spec)
    return get_family(spec if isinstance(spec, str) else spec.family)
