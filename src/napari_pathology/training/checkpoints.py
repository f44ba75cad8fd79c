"""A training job's files: the best and last checkpoints, the optimiser state beside the last one.

:func:`check_output` refuses an unwritable output folder and an existing
model (unless resuming or told to overwrite) before any work;
:func:`check_resume` checks the last checkpoint and its optimiser state
(trainers call it before they start any reader thread). No Qt, no napari.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from napari_pathology.fileio import ensure_writable_dir
from napari_pathology.models.registry import ModelError, PathologyModel, load_untrusted, tensors_digest
from napari_pathology.training.events import TrainingError

__all__ = ["check_output", "check_resume", "checkpoint_paths", "load_last_checkpoint", "resume_state"]


def checkpoint_paths(out: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """``(best, last, state)`` paths for a job writing ``out``."""
    best = Path(out)
    if best.suffix not in (".pt", ".pth", ".ckpt"):
        best = best.with_name(best.name + ".pt")
    last = best.with_name(best.stem + ".last.pt")
    state = best.with_name(best.stem + ".last.state.pt")
    return best, last, state


def check_output(out: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written or that would replace a trained model.

    Returns the best checkpoint path.

    Raises
    ------
    OutputError
        When the folder cannot be created or written (one line naming it).
    TrainingError
        When ``out`` (or its last checkpoint) exists and neither ``resume`` nor ``overwrite`` is set.

    """
    best, last, _state = checkpoint_paths(out)
    ensure_writable_dir(best.parent)
    if not (resume or overwrite):
        existing = next((p for p in (best, last) if p.exists()), None)
        if existing is not None:
            raise TrainingError(
                f"{existing} exists; use --resume to continue it or choose another --out, "
                "or --overwrite to replace it"
            )
    return best


def load_last_checkpoint(out: str | os.PathLike[str]) -> PathologyModel:
    """The last checkpoint of a job writing ``out``, to resume; :class:`TrainingError` if there is none."""
    from napari_pathology.models.registry import load_checkpoint

    last = checkpoint_paths(out)[1]
    if not last.is_file():
        raise TrainingError(
            f"cannot resume: {last} does not exist (no checkpoint was saved); start without --resume"
        )
    try:
        return load_checkpoint(last)
    except ModelError as error:
        raise TrainingError(f"cannot resume: {error}") from error


def resume_state(out: str | os.PathLike[str]) -> dict[str, Any]:
    """The optimiser state and step saved beside the last checkpoint of ``out``, checked.

    Raises
    ------
    TrainingError
        One line naming the file when it is missing, holds code, is torn,
        lacks the optimiser state or step, or its tensors do not match their digest.

    """
    _, last, state_path = checkpoint_paths(out)
    if not state_path.is_file():
        raise TrainingError(
            f"cannot resume: the optimiser state {state_path} is missing (it is written beside "
            f"{last.name}); start without --resume, or with --overwrite to train {Path(out).name} afresh"
        )
    try:
        state = load_untrusted(state_path, f"cannot resume from {state_path}")
    except ModelError as error:
        raise TrainingError(str(error)) from error
    where = f"cannot resume from {state_path}"
    if not isinstance(state, Mapping) or not isinstance(state.get("optimizer"), Mapping):
        raise TrainingError(f"{where}: it holds no optimiser state (not a file written by a training job)")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TrainingError(f"{where}: its step {step!r} is not a whole number >= 0")
    digest = state.get("sha256")
    if digest is not None and digest != tensors_digest(state.get("optimizer")):
        raise TrainingError(
            f"{where}: the file is damaged: its tensors do not match the digest saved with them"
        )
    return dict(state)


def check_resume(out: str | os.PathLike[str]) -> tuple[PathologyModel, dict[str, Any]]:
    """The last checkpoint and optimiser state of ``out``, both checked; call it before any other work.

    Raises
    ------
    TrainingError
        One line, when either is missing, damaged or holds code.

    """
    last = checkpoint_paths(out)[1]
    if not last.is_file():
        raise TrainingError(
            f"cannot resume: {last} does not exist (no checkpoint was saved); start without --resume"
        )
    state = resume_state(out)
    model = load_last_checkpoint(out)
    return model, state
