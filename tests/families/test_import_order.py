"""Shipped weights register whatever module a program imports first."""

from __future__ import annotations

import subprocess
import sys

import pytest

FIRST_IMPORTS = [
    "napari_pathology.families.nucleus_purity.data",
    "napari_pathology.families.metastasis.train",
    "napari_pathology.families.tumor_normal.train",
    "napari_pathology.nuclei.classify",
]


@pytest.mark.parametrize("first", FIRST_IMPORTS)
def test_demo_weights_are_registered_whatever_is_imported_first(first: str) -> None:
    code = (
        f"import {first}\n"
        "from napari_pathology.models import list_models, pretrained_path, resolve_model\n"
        "names = {s.name for s in list_models()}\n"
        "for name in ('metastasis', 'tumor-normal', 'nucleus-purity'):\n"
        "    assert name in names and pretrained_path(name) is not None, name\n"
        "print(resolve_model('nucleus-purity').spec.family)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "nucleus-purity"
    assert "not registered" not in done.stderr, done.stderr
