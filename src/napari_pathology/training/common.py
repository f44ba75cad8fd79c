"""Pieces the family trainers share: slide splits, starting models, checkpoint names, setting checks."""

from __future__ import annotations

import math
import re
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.cohort import SlideEntry
from napari_pathology.fileio import require_finite
from napari_pathology.models.registry import (
    ModelError,
    PathologyModel,
    create_model,
    pretrained_path,
    resolve_model,
)
from napari_pathology.training.events import TrainEvent, TrainingError

__all__ = [
    "check_count",
    "check_flag",
    "check_number",
    "model_name_for",
    "progress_as_log",
    "provenance_entries",
    "split_by_slide",
    "starting_model",
]


def check_count(settings: Any, name: str, minimum: int = 1, *, optional: bool = False) -> None:
    """Refuse ``settings.<name>`` unless it is a whole number >= ``minimum`` (None too when ``optional``).

    Raises
    ------
    TrainingError
        Naming the setting and the value.

    """
    value = getattr(settings, name)
    if optional and value is None:
        return
    whole = isinstance(value, int | float) and not isinstance(value, bool)
    if not whole or not math.isfinite(value) or value != int(value) or value < minimum:
        raise TrainingError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    object.__setattr__(settings, name, int(value))


def check_number(
    settings: Any,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    inclusive: bool = True,
    below: float | None = None,
    optional: bool = False,
) -> None:
    """Refuse ``settings.<name>`` unless it is a finite number in ``[minimum, maximum]`` (and ``< below``).

    ``inclusive=False`` makes ``minimum`` exclusive (``> minimum``).

    Raises
    ------
    TrainingError
        Naming the setting and the value.

    """
    value = getattr(settings, name)
    if optional and value is None:
        return
    try:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        number = require_finite(value, name, minimum=minimum, maximum=maximum, inclusive=inclusive)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    if below is not None and not number < below:
        raise TrainingError(f"{name} must be below {below:g}, got {value!r}")
    object.__setattr__(settings, name, number)


def check_flag(settings: Any, name: str) -> None:
    """Refuse ``settings.<name>`` unless it is True or False."""
    value = getattr(settings, name)
    if not isinstance(value, bool):
        raise TrainingError(f"{name} must be true or false, got {value!r}")


def split_by_slide(
    entries: Sequence[SlideEntry], fraction: float, seed: int
) -> tuple[list[SlideEntry], list[SlideEntry]]:
    """Split slides into training and validation sets, stratified by label.

    Each label contributes ``round(fraction * n)`` slides (at least one when
    ``fraction > 0`` and the label has two or more slides), so no slide's
    patches are on both sides.

    Raises
    ------
    TrainingError
        When ``fraction > 0`` but some label has a single slide, or no slide is left to train on.
    """
    if not 0.0 <= fraction < 1.0:
        raise TrainingError(f"the validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return list(entries), []
    rng = np.random.default_rng(seed)
    groups: dict[str, list[SlideEntry]] = {}
    for entry in entries:
        groups.setdefault(str(entry.label), []).append(entry)
    train, val = [], []
    for label, group in sorted(groups.items()):
        if len(group) < 2:
            raise TrainingError(
                f"too few slides for a validation split: label {label!r} has one slide; add slides or "
                "set the validation fraction to 0"
            )
        order = rng.permutation(len(group))
        k = min(len(group) - 1, max(1, round(fraction * len(group))))
        val += [group[i] for i in order[:k]]
        train += [group[i] for i in order[k:]]
    return train, val


def starting_model(start: str | Path) -> tuple[PathologyModel, bool]:
    """The model to train: a registry name (fresh) or a checkpoint / trained name (fine-tuning).

    Returns
    -------
    model : PathologyModel
    pretrained : bool
        Whether it starts from trained weights.
    """
    try:
        if isinstance(start, str) and pretrained_path(start) is None:
            try:
                return create_model(start), False
            except ModelError:
                pass
        return resolve_model(start), True
    except ModelError as error:
        raise TrainingError(str(error)) from error


def model_name_for(out: str | Path) -> str:
    """A registry-safe model name from a checkpoint path (its stem)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(out).stem).strip("-")
    return name or "trained-model"


def provenance_entries(entries: Sequence[SlideEntry]) -> list[dict[str, Any]]:
    """Slides of a split, for the checkpoint's provenance."""
    return [{"slide": e.path.name, "label": e.label} for e in entries]


def progress_as_log(job: Generator[Any, None, Any], total_steps: int) -> Generator[TrainEvent, None, Any]:
    """Relay a set-up generator's :class:`~napari_pathology.progress.Progress` as ``log`` events."""
    while True:
        try:
            progress = next(job)
        except StopIteration as stop:
            return stop.value
        yield TrainEvent("log", 0, total_steps, message=progress.message)
