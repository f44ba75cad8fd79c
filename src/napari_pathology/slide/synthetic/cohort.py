"""A small synthetic cohort for slide-level subtyping: N slides of each class and its slide table.

The classes are :data:`~napari_pathology.slide.synthetic.truth.SUBTYPE_LABELS`
(``normal``, ``tumour_a``, ``tumour_b``); the table is the plugin's slide
table (``slide,label,annotations``, written by
:func:`napari_pathology.cohort.write_slide_table`), so
``read_slide_table(table, classes=SUBTYPE_LABELS)`` reads it back.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

from napari_pathology.progress import Progress, run_to_completion
from napari_pathology.slide.synthetic.truth import SUBTYPE_LABELS, load_truth, slide_label, truth_paths
from napari_pathology.slide.synthetic.writer import generate_synthetic_slide

#: Slide options per class (the order of SUBTYPE_LABELS).
_CLASS_OPTIONS: dict[str, dict[str, Any]] = {
    "normal": {"negative": True, "tumour_type": None},
    "tumour_a": {"negative": False, "tumour_type": "A"},
    "tumour_b": {"negative": False, "tumour_type": "B"},
}


def _already_written(path: Path, seed: int, size: int, mpp: float, options: dict[str, Any]) -> bool:
    """The slide and its truth exist and were made with these arguments (generation is deterministic)."""
    if not path.is_file():
        return False
    try:
        truth = load_truth(path)
    except (OSError, ValueError):
        return False
    made = truth.get("options", {})
    return (
        truth.get("seed") == seed
        and (truth.get("width"), truth.get("height")) == (size, size)
        and truth.get("mpp") == mpp
        and all(made.get(k) == v for k, v in options.items())
    )


def generate_subtype_cohort(
    folder: str | os.PathLike[str],
    n_per_class: int,
    seed: int = 0,
    *,
    size: int = 4096,
    mpp: float = 0.5,
    micro_fraction: float = 0.0,
    subtypes: bool = True,
) -> Generator[Progress, None, Path]:
    """Write ``n_per_class`` normal, tumour type A and tumour type B slides and their slide table.

    Slide ``k`` of class ``c`` (the index in :data:`SUBTYPE_LABELS`) is
    ``folder/<class>-<k>.tif`` with seed ``seed * 1000 + 3 * k + c``. Slides
    already written with the same arguments are kept, so an interrupted run
    resumes.

    Parameters
    ----------
    folder : path-like
        Output folder; the table is ``folder/slides.csv``.
    n_per_class : int
        Slides per class (1-333).
    seed : int
        Cohort seed.
    size : int
        Level-0 side in px (4096 at 0.5 um/px: about 2 mm^2 of tissue, ~3 MB, seconds).
    mpp : float
        Level-0 um/px.
    micro_fraction : float
        Share of each tumour class given one small lesion instead of 1-3 larger ones.
    subtypes : bool
        Label slides ``normal``/``tumour_a``/``tumour_b``; else ``normal``/``tumour``.

    Yields
    ------
    Progress
        One step per slide.

    Returns
    -------
    Path
        The slide table (``slide,label,annotations``).

    Raises
    ------
    ValueError
        ``n_per_class`` outside 1-333 or ``micro_fraction`` outside [0, 1].
    """
    from napari_pathology.cohort import SlideEntry, write_slide_table

    n = int(n_per_class)
    if not 1 <= n <= 333:
        raise ValueError(
            f"n_per_class must be in 1-333 (seeds stay within the cohort's 1000), got {n_per_class}"
        )
    if not 0.0 <= float(micro_fraction) <= 1.0:
        raise ValueError(f"micro_fraction must be in [0, 1], got {micro_fraction}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_micro = round(n * float(micro_fraction))
    plan = [(k, c, name) for k in range(n) for c, name in enumerate(SUBTYPE_LABELS)]
    entries = []
    for step, (k, c, name) in enumerate(plan):
        path = folder / f"{name}-{k:03d}.tif"
        yield Progress(step, len(plan), f"slide {step + 1}/{len(plan)}: {path.name}")
        options = dict(_CLASS_OPTIONS[name], tumour_size="micro" if c and k < n_micro else "macro")
        slide_seed = int(seed) * 1000 + 3 * k + c
        if not _already_written(path, slide_seed, int(size), float(mpp), options):
            for _ in generate_synthetic_slide(path, int(size), slide_seed, mpp=float(mpp), **options):
                pass
        label = slide_label(path, subtypes=subtypes)
        entries.append(SlideEntry(path, label, truth_paths(path)["tumour_geojson"]))
    table = write_slide_table(entries, folder / "slides.csv")
    yield Progress(len(plan), len(plan), f"{len(plan)} slides in {folder}")
    return table


def write_subtype_cohort(
    folder: str | os.PathLike[str], n_per_class: int, seed: int = 0, **kwargs: Any
) -> Path:
    """Write a subtyping cohort, blocking until done (see :func:`generate_subtype_cohort`).

    Parameters
    ----------
    folder : path-like
        Output folder.
    n_per_class : int
        Slides per class.
    seed : int
        Cohort seed.
    **kwargs
        Passed to :func:`generate_subtype_cohort`.

    Returns
    -------
    Path
        The slide table.
    """
    return run_to_completion(generate_subtype_cohort(folder, n_per_class, seed, **kwargs))
