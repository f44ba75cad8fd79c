"""Cached synthetic slides for the demo, the sample data and first steps.

Generating a slide takes seconds to a minute, so each one is made once and
kept in a cache folder (``$NAPARI_PATHOLOGY_CACHE`` or the user cache
directory). A slide appears in the cache only when complete: it is written in
a temporary folder and moved in with its ground-truth JSON last.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator
from pathlib import Path

from napari_pathology.progress import Progress, run_to_completion

#: Size of the demo slide (pixels a side) and of the napari sample data.
DEMO_SIZE = 16_384
SAMPLE_SIZE = 8_192
DEMO_SEED = 7


def cache_dir() -> Path:
    """The folder that holds generated demo slides (created on demand)."""
    override = os.environ.get("NAPARI_PATHOLOGY_CACHE")
    if override:
        path = Path(override)
    else:
        from platformdirs import user_cache_dir

        path = Path(user_cache_dir("napari-pathology"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def demo_slide_name(size: int, seed: int, negative: bool) -> str:
    """File name of a cached synthetic slide."""
    kind = "normal" if negative else "tumour"
    return f"synthetic-{kind}-{size}px-seed{seed}.tif"


def ensure_demo_slide(
    size: int = DEMO_SIZE,
    seed: int = DEMO_SEED,
    *,
    negative: bool = False,
    folder: Path | None = None,
) -> Generator[Progress, None, Path]:
    """Yield progress while making a cached synthetic slide; return its path.

    Returns at once when the slide is already in the cache.
    """
    from napari_pathology.slide.synthetic import generate_synthetic_slide, truth_paths

    folder = Path(folder) if folder is not None else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / demo_slide_name(size, seed, negative)
    if target.exists() and truth_paths(target)["truth_json"].exists():
        return target
    with tempfile.TemporaryDirectory(dir=folder, prefix=".making-") as tmp:
        staged = Path(tmp) / target.name
        yield from generate_synthetic_slide(staged, size=size, seed=seed, negative=negative)
        staged_paths = truth_paths(staged)
        final_paths = truth_paths(target)
        for key in sorted(staged_paths, key=lambda k: k == "truth_json"):
            if staged_paths[key].exists():
                shutil.move(str(staged_paths[key]), final_paths[key])
    return target


def demo_slide(size: int = DEMO_SIZE, seed: int = DEMO_SEED, *, negative: bool = False) -> Path:
    """Path of a cached synthetic slide, generating it first if needed."""
    return run_to_completion(ensure_demo_slide(size, seed, negative=negative))
