"""One home for the worker wiring every panel repeats: a job in napari's thread pool, tied to the panel.

A panel's long work is a generator yielding :class:`~napari_pathology.progress.Progress`
(or a plain function). :func:`start_worker` runs it with napari's
``create_worker`` and wires it to the panel once: yielded progress goes to a
progress bar and a status line, errors go to the panel (never re-raised on
the Qt thread as tracebacks), the buttons that start work are disabled while
it runs and enabled again when it ends, a Cancel button is enabled only while
it runs, and closing the viewer (which aborts the worker between two yields)
closes the job so that it can save what it has. Usage::

    from napari_pathology._widgets._workers import start_worker

    def run(self) -> None:
        self._cancel = threading.Event()
        job = analysis_job(..., self._cancel)  # a generator of Progress, returns the result
        self.running = start_worker(
            job,
            progress=self.progress,           # QProgressBar: busy, then done / total
            status=self.status,               # QLabel (or a callable taking a str)
            busy=(self.run_button,),          # disabled while it runs
            cancel_button=self.cancel_button,  # enabled while it runs
            cancel_event=self._cancel,        # set by Cancel (the job stops at its next check)
            on_done=self._on_result,          # the job's return value, on the Qt thread
            on_error=self._on_error,          # default: "failed: ..." in status + a notification
            on_finished=self._on_finished,    # after done, error or cancel
        )
        self.worker = self.running.worker     # napari's worker (signals yielded, finished, ...)

    def cancel(self) -> None:  # the Cancel button's slot
        self.running.cancel("cancelling after this batch...")

For a call that returns at once, :func:`run_in_thread` is the short form.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Generator, Iterable
from typing import Any

from qtpy.QtWidgets import QLabel, QProgressBar, QWidget

__all__ = ["PanelWorker", "passthrough", "run_in_thread", "show_failure", "start_worker"]


def passthrough(job: Generator[Any, None, Any]) -> Generator[Any, None, Any]:
    """Let napari's generator worker drive an already-built job (``create_worker(passthrough, job)``)."""
    return (yield from job)


def _say(status: QLabel | Callable[[str], None] | None, text: str) -> None:
    if status is None:
        return
    if isinstance(status, QLabel):
        status.setText(text)
    else:
        status(text)


def show_failure(status: QLabel | Callable[[str], None] | None, error: BaseException) -> None:
    """Say a worker's error in a panel's status line (a QLabel or a callable) and as a notification."""
    from napari.utils.notifications import show_error

    _say(status, f"failed: {error}")
    show_error(str(error))


def show_progress(progress: QProgressBar | None, status: Any, event: Any) -> None:
    """Show one yielded event: ``done / total`` on the bar (busy when the total is unknown), its message."""
    total = int(getattr(event, "total", 0) or 0)
    if progress is not None and total > 0:
        progress.setRange(0, total)
        progress.setValue(min(int(getattr(event, "done", 0) or 0), total))
    message = getattr(event, "message", "")
    if message:
        _say(status, str(message))


def _deleted(widget: QWidget) -> bool:
    """Whether Qt has deleted the widget behind this Python object (its viewer was closed)."""
    try:
        widget.objectName()
    except RuntimeError:
        return True
    return False


class PanelWorker:
    """A running job and its wiring (made by :func:`start_worker`).

    Attributes
    ----------
    worker : napari.qt.threading.WorkerBase
        napari's worker: its ``yielded``, ``returned``, ``errored``, ``finished``
        and ``aborted`` signals.
    cancel_event : threading.Event
        Set by :meth:`cancel`; a job given it stops at its next check.
    """

    def __init__(self, worker: Any, cancel_event: threading.Event, quit_on_cancel: bool) -> None:
        self.worker = worker
        self.cancel_event = cancel_event
        self._quit_on_cancel = quit_on_cancel
        self._running = True
        self._cancel_button: QWidget | None = None
        self._status: Any = None
        worker.finished.connect(self._ended)

    @property
    def running(self) -> bool:
        """Whether the job has not finished yet (done, failed or cancelled)."""
        return self._running

    def cancel(self, message: str = "cancelling...") -> bool:
        """Ask the job to stop: set its event (and quit the worker between two yields if asked to).

        Returns
        -------
        bool
            False when it had already ended or been cancelled.
        """
        if not self._running or self.cancel_event.is_set():
            return False
        self.cancel_event.set()
        if self._quit_on_cancel:
            self.worker.quit()
        if self._cancel_button is not None:
            self._cancel_button.setEnabled(False)
        _say(self._status, message)
        return True

    def _ended(self) -> None:
        self._running = False


def start_worker(
    job: Generator[Any, None, Any] | Callable[..., Any],
    *args: Any,
    progress: QProgressBar | None = None,
    status: QLabel | Callable[[str], None] | None = None,
    busy: Iterable[QWidget] = (),
    cancel_button: QWidget | None = None,
    cancel_event: threading.Event | None = None,
    quit_on_cancel: bool | None = None,
    on_progress: Callable[[Any], None] | None = None,
    on_done: Callable[[Any], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_finished: Callable[[], None] | None = None,
) -> PanelWorker:
    """Run ``job`` (a generator, or ``job(*args)``) in napari's thread pool, wired to a panel.

    Parameters
    ----------
    job : generator or callable
        A generator yielding :class:`~napari_pathology.progress.Progress` and
        returning the result, a generator function called with ``args``, or a
        plain function called with ``args`` in the thread.
    progress : QProgressBar, optional
        Busy (no range) at once, ``done / total`` as events come; left there at the end.
    status : QLabel or callable, optional
        Gets each event's message, and ``failed: ...`` on an error.
    busy : iterable of QWidget
        Disabled while the job runs, enabled again when it ends.
    cancel_button : QWidget, optional
        Enabled while the job runs, disabled by :meth:`PanelWorker.cancel` and at
        the end (the panel connects it to a slot calling ``cancel()``).
    cancel_event : threading.Event, optional
        The event the job checks (a new one when not given).
    quit_on_cancel : bool, optional
        Also quit the worker between two yields on Cancel (for jobs that do not
        check the event); default: when no ``cancel_event`` is given.
    on_progress, on_done, on_error, on_finished : callable, optional
        Called on the Qt thread with each yielded event, the result, the
        error (default :func:`show_failure`) and at the end (after done, error
        or cancel, when the buttons are enabled again).

    Returns
    -------
    PanelWorker
        The started job: ``.worker``, ``.cancel()``, ``.running``.
    """
    from napari.qt.threading import create_worker

    busy = list(busy)
    anchors = [w for w in (progress, status, cancel_button, *busy) if isinstance(w, QWidget)]

    def alive() -> bool:  # signals queued before a viewer closed still arrive after its panels are deleted
        return not any(_deleted(widget) for widget in anchors)

    if inspect.isgeneratorfunction(job):
        job = job(*args)
        args = ()
    generator = inspect.isgenerator(job)
    if quit_on_cancel is None:
        quit_on_cancel = cancel_event is None
    event = cancel_event if cancel_event is not None else threading.Event()
    handler = on_error or (lambda error: show_failure(status, error))
    # errors go to the panel only (an "errored" connection given here stops superqt re-raising them)
    if generator:
        worker = create_worker(passthrough, job, _start_thread=False, _connect={"errored": handler})
        # Closing the viewer aborts the worker between two yields, leaving the job suspended:
        # close it so that it can save what it has.
        worker.aborted.connect(job.close)
        worker.yielded.connect(lambda item: alive() and show_progress(progress, status, item))
        if on_progress is not None:
            worker.yielded.connect(on_progress)
    else:
        worker = create_worker(job, *args, _start_thread=False, _connect={"errored": handler})
    running = PanelWorker(worker, event, quit_on_cancel)
    running._status = status
    running._cancel_button = cancel_button
    if on_done is not None:
        worker.returned.connect(on_done)
    widgets = list(busy)

    def finished() -> None:
        if not alive():  # the panel went with the viewer: nothing left to update
            return
        for widget in widgets:
            widget.setEnabled(True)
        if cancel_button is not None:
            cancel_button.setEnabled(False)
        if progress is not None and progress.maximum() == 0:  # still busy: no event had a total
            progress.setRange(0, 1)
        if on_finished is not None:
            on_finished()

    worker.finished.connect(finished)
    for widget in widgets:
        widget.setEnabled(False)
    if cancel_button is not None:
        cancel_button.setEnabled(True)
    if progress is not None:
        progress.setRange(0, 0)
    worker.start()
    return running


def run_in_thread(
    function: Callable[..., Any],
    *args: Any,
    on_done: Callable[[Any], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> Any:
    """Run ``function(*args)`` in napari's thread pool; call back on the Qt thread; napari's worker.

    Errors are shown as a napari notification unless ``on_error`` is given;
    either way they are not re-raised on the Qt thread as tracebacks.
    """
    return start_worker(function, *args, on_done=on_done, on_error=on_error).worker
