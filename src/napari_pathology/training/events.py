"""What a training job reports while it runs, and what it returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EVENT_KINDS", "TrainEvent", "TrainResult", "TrainingError"]

#: ``start`` (set-up done), ``step`` (loss), ``validation`` (metrics), ``checkpoint`` (a file
#: written), ``log`` (a message, e.g. an out-of-memory retry), ``done`` (finished or stopped).
EVENT_KINDS = ("start", "step", "validation", "checkpoint", "log", "done")


class TrainingError(ValueError):
    """A training job cannot start or continue; the message says what to change."""


@dataclass(frozen=True)
class TrainEvent:
    """One report from a training generator.

    Attributes
    ----------
    kind : str
        One of :data:`EVENT_KINDS`.
    step, total_steps : int
        Optimiser steps done and planned.
    loss : float, optional
        Training loss of the step (``step`` events, smoothed).
    metrics : dict
        Validation metrics (``validation`` and ``checkpoint`` events).
    path : str, optional
        Checkpoint written (``checkpoint`` events).
    message : str
        Human-readable line for logs.
    elapsed : float
        Seconds since the job started.
    """

    kind: str
    step: int
    total_steps: int
    loss: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    message: str = ""
    elapsed: float = 0.0

    @property
    def eta(self) -> float:
        """Seconds left at the current pace (inf before the first step)."""
        if self.step <= 0 or self.elapsed <= 0:
            return math.inf
        return self.elapsed / self.step * max(0, self.total_steps - self.step)

    @property
    def fraction(self) -> float:
        """Share of the planned steps done."""
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0


@dataclass
class TrainResult:
    """What a finished (or stopped) training job left behind.

    Attributes
    ----------
    best, last : Path or None
        Best-validation and last checkpoints.
    step : int
        Steps done.
    stopped : bool
        Whether the job was stopped before its planned end.
    metrics : dict
        Validation metrics of the best checkpoint.
    history : list of dict
        ``{"step", "loss"}`` and ``{"step", **metrics}`` rows, in order.
    """

    best: Path | None
    last: Path | None
    step: int
    stopped: bool
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
