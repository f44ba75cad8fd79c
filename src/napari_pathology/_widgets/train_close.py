"""Closing the viewer stops the Train panel's jobs (each saves its last checkpoint first)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QWidget

if TYPE_CHECKING:
    from napari_pathology.training.queue import TrainingJob

__all__ = ["CloseWatcher", "stop_jobs"]


class CloseWatcher(QObject):
    """Stops a panel's jobs when the main window closes (the stop saves their last checkpoint)."""

    def __init__(self, window: QWidget, stop: Callable[[], None]) -> None:
        super().__init__(window)
        self._stop = stop
        self._closing = False
        window.installEventFilter(self)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        """Watch Close (programmatic: stop now; by the user: once the window hides) and Show."""
        kind = event.type()
        if kind == QEvent.Type.Close:
            if event.spontaneous():
                self._closing = True  # a confirmation dialog may still cancel it
            else:
                self._stop()
        elif kind == QEvent.Type.Hide and self._closing and not event.spontaneous():
            self._stop()
        elif kind == QEvent.Type.Show:
            self._closing = False
        return False


def stop_jobs(jobs: list[TrainingJob]) -> None:
    """Ask every job to stop (each finishes its step and saves its last checkpoint)."""
    for job in list(jobs):
        job.stop()
