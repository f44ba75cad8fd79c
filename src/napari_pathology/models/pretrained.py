"""Weights that ship with the package, registered under short names.

``metastasis`` and ``tumor-normal`` are small demo models trained on
synthetic slides by ``scripts/train_demo_models.py`` (*synthetic demo, not
for diagnostic use*): they exist so that **Run** on the demo slide shows the
planted tumour right after install. Their checkpoints carry the data,
hyper-parameters and metrics they were trained with.
"""

from __future__ import annotations

from pathlib import Path

from napari_pathology.models.registry import ModelSpec, register_pretrained

__all__ = ["SHIPPED_WEIGHTS", "WEIGHTS_DIR", "register_shipped_weights"]

WEIGHTS_DIR = Path(__file__).with_name("weights")
#: Registered name -> checkpoint file in :data:`WEIGHTS_DIR`.
SHIPPED_WEIGHTS = {
    "metastasis": "metastasis-demo.pt",
    "tumor-normal": "tumor-normal-demo.pt",
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
