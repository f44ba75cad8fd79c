"""Weights that ship with the package, registered under short names.

``metastasis`` and ``tumor-normal`` are small demo models trained on
synthetic slides by ``scripts/train_demo_models.py``, and ``nucleus-purity``
by ``scripts/train_nucleus_demo.py`` (*synthetic demo, not for diagnostic
use*): they exist so that **Run** on the demo slide shows the
planted tumour right after install. Their checkpoints carry the data,
hyper-parameters and metrics they were trained with.
"""

from __future__ import annotations

from pathlib import Path

from napari_pathology.models.registry import ModelSpec, pretrained_path, register_pretrained

__all__ = [
    "SHIPPED_WEIGHTS",
    "WEIGHTS_DIR",
    "is_untrained",
    "register_shipped_weights",
    "sorted_for_analysis",
]

WEIGHTS_DIR = Path(__file__).with_name("weights")
#: Registered name -> checkpoint file in :data:`WEIGHTS_DIR`.
SHIPPED_WEIGHTS = {
    "metastasis": "metastasis-demo.pt",
    "tumor-normal": "tumor-normal-demo.pt",
    "nucleus-purity": "nucleus-purity-demo.pt",
}


def register_shipped_weights() -> list[ModelSpec]:
    """Register every shipped checkpoint that is present; returns their specs."""
    specs = []
    for name, filename in SHIPPED_WEIGHTS.items():
        path = WEIGHTS_DIR / filename
        if path.is_file():
            spec = register_pretrained(path, name=name)
            if spec is not None:
                specs.append(spec)
    return specs


#: Families whose registered models are fixed scorers, usable without training.
FIXED_FAMILIES = ("baseline",)


def is_untrained(spec: ModelSpec) -> bool:
    """Whether a registered name is only a starting point for training (random or ImageNet weights)."""
    return pretrained_path(spec.name) is None and spec.family not in FIXED_FAMILIES


def sorted_for_analysis(specs: list[ModelSpec]) -> list[ModelSpec]:
    """Trained models first, then fixed baselines, then untrained starting points; by name within each."""

    def rank(spec: ModelSpec) -> tuple[int, str]:
        if pretrained_path(spec.name) is not None:
            return 0, spec.name
        return (1 if spec.family in FIXED_FAMILIES else 2), spec.name

    return sorted(specs, key=rank)
