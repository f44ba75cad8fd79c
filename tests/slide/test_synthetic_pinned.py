"""Pinned pixels: the generator's existing seeds keep their exact output.

The demo weights and the numbers other tests assert were made on these
pixels, so a change to the generator must leave them alone. The SHA-256 of
the rendered level-0 array (before JPEG), of the truth JSON and of the
nucleus table were computed on the generator as it was before tumour type B
existed; type A (the default) must reproduce them bit for bit. The truth JSON
has since gained only the tumour type (top level, per lesion, in the options)
and a ``tumour_b`` nucleus count; without those it is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from napari_pathology.slide import synthetic
from napari_pathology.slide.synthetic import write_synthetic_slide

# (size, seed, options) -> SHA-256 of level-0 RGB, of the truth JSON, of the nucleus CSV
PINNED = {
    "tumour": (
        (1536, 1280),
        7,
        {},
        "5998513a2959b9febd457d1c3f41ef3430ba9f0721e960e409260a7a8c986d61",
        "ad7e1a6dc53bc8cd9c456114a0a3ff5d9a3b005969f683e141f51cdebba22310",
        "f44f42aeeae3c5479b138a0d0ad79daf28062e8f03cd16b463c7089de147e058",
    ),
    "normal": (
        1024,
        3,
        {"negative": True},
        "02c93f8298b6c2b46e7881a8683ff1c2bcf0259549a6e5396bb68cc8b60b1309",
        "22e4c03af4cc447f97bc5df390b4c11448f47aae897cff5567a63292e32e7231",
        "e029aebd2a34195d8ae6a3c176c9b3e5f3db73fc6de9557a560856d7c43f6ca7",
    ),
    "micro": (
        1024,
        5,
        {"tumour_size": "micro", "pen_mark": True},
        "4c6679b7824851d3c9b65294b9b7acfa5c08a6addb53909238a0f86abfab9359",
        "983e264a408a686cf17c16ca947fa1ac7ca98758bcb3082af505623485fd9cfa",
        "1fbb16d468697d7afe47c4f33c81898e72f2c7789997af13784c7f3ccf7f3838",
    ),
}
# Asking for type A explicitly is the default.
PINNED["micro, type A"] = (
    *PINNED["micro"][:2],
    {**PINNED["micro"][2], "tumour_type": "A"},
    *PINNED["micro"][3:],
)


def level0_sha256(size: int | tuple[int, int], seed: int, options: dict) -> str:
    """SHA-256 of the level-0 pixels exactly as the writer renders them (blocks, before JPEG)."""
    width, height = (size, size) if isinstance(size, int) else size
    kwargs = {"negative": False, "tumour_size": "macro", "pen_mark": False, "blurred_patch": False}
    kwargs.update(options)
    scene = synthetic._build_scene(width, height, 0.5, seed, **kwargs)
    block = synthetic.writer._BLOCK
    rows = []
    for r0 in range(0, height, block):
        r1 = min(height, r0 + block)
        strip = [
            synthetic.render._render_block(scene, r0, r1, c0, min(width, c0 + block))
            for c0 in range(0, width, block)
        ]
        rows.append(np.concatenate(strip, axis=1))
    rgb = np.ascontiguousarray(np.concatenate(rows, axis=0))
    assert rgb.shape == (height, width, 3) and rgb.dtype == np.uint8
    return hashlib.sha256(rgb.tobytes()).hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def truth_sha256_without_tumour_type(path: Path) -> str:
    """SHA-256 of the truth JSON as written before tumour types (their additions removed, checked)."""
    text = path.read_text()
    truth = json.loads(text)
    assert json.dumps(truth, indent=2) == text  # re-dumping reproduces the file's bytes
    kind = truth.pop("tumour_type")
    assert kind == ("A" if truth["label"] == "tumour" else None)
    assert truth["options"].pop("tumour_type") == kind
    assert truth["n_nuclei_by_kind"].pop("tumour_b") == 0
    for lesion in truth["lesions"]:
        assert lesion.pop("tumour_type") == kind
    return hashlib.sha256(json.dumps(truth, indent=2).encode()).hexdigest()


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "tumour" else n for n in PINNED]
)
def test_existing_seeds_keep_their_pixels_and_truth(name: str, tmp_path: Path) -> None:
    size, seed, options, pixels, truth_json, nuclei_csv = PINNED[name]
    assert level0_sha256(size, seed, options) == pixels
    truth = write_synthetic_slide(tmp_path / "pinned.tif", size, seed, **options)
    assert truth_sha256_without_tumour_type(truth.truth_json) == truth_json
    assert file_sha256(truth.nuclei_csv) == nuclei_csv
