"""Weights that ship with the package, registered under short names by their families.

Each family names its own demo checkpoints (``Family.demo_weights``: a
registered name -> a file, relative to :data:`WEIGHTS_DIR` unless absolute);
the family registry registers them when it registers the family. They are
small demo models trained on synthetic slides by the scripts in
``scripts/`` (*synthetic demo, not for diagnostic use*): they exist so that
**Run** on the demo slide shows the planted tumour right after install.
Their checkpoints carry the data, hyper-parameters and metrics they were
trained with.
"""

from __future__ import annotations

import os
from pathlib import Path

from napari_pathology.models.registry import ModelSpec, pretrained_path, register_pretrained

__all__ = [
    "WEIGHTS_DIR",
    "demo_weight_path",
    "is_untrained",
    "register_demo_weights",
    "register_shipped_weights",
    "shipped_weights",
    "sorted_for_analysis",
]

WEIGHTS_DIR = Path(__file__).with_name("weights")


def demo_weight_path(file: str | os.PathLike[str]) -> Path:
    """A family's demo checkpoint: absolute, or relative to :data:`WEIGHTS_DIR`."""
    path = Path(file)
    return path if path.is_absolute() else WEIGHTS_DIR / path


def register_demo_weights(weights: dict[str, str | os.PathLike[str]]) -> list[ModelSpec]:
    """Register every present checkpoint of ``{name: file}``; returns their specs."""
    specs = []
    for name, file in weights.items():
        path = demo_weight_path(file)
        if path.is_file():
            spec = register_pretrained(path, name=name)
            if spec is not None:
                specs.append(spec)
    return specs


def shipped_weights() -> dict[str, Path]:
    """Registered name -> checkpoint file of every registered family's demo weights."""
    from napari_pathology.families import list_families

    return {name: demo_weight_path(file) for f in list_families() for name, file in f.demo_weights.items()}


def register_shipped_weights() -> list[ModelSpec]:
    """Register every registered family's shipped checkpoints that are present; returns their specs."""
    return register_demo_weights(dict(shipped_weights()))


def _fixed(family: str) -> bool:
    from napari_pathology.families import get_family

    try:
        return get_family(family).fixed
    except KeyError:
        return False


def is_untrained(spec: ModelSpec) -> bool:
    """Whether a registered name is only a starting point for training (random or ImageNet weights)."""
    return pretrained_path(spec.name) is None and not _fixed(spec.family)


def sorted_for_analysis(specs: list[ModelSpec]) -> list[ModelSpec]:
    """Trained models first, then fixed baselines, then untrained starting points; by name within each."""

    def rank(spec: ModelSpec) -> tuple[int, str]:
        if pretrained_path(spec.name) is not None:
            return 0, spec.name
        return (1 if _fixed(spec.family) else 2), spec.name

    return sorted(specs, key=rank)
