"""The panels' one worker helper: progress to the bar and status, buttons, errors, cancel, abort."""

from __future__ import annotations

import threading
import time

from qtpy.QtWidgets import QLabel, QProgressBar, QPushButton

from napari_pathology._widgets._workers import run_in_thread, start_worker
from napari_pathology.progress import Progress


def _widgets(qtbot):
    bar, status, run, cancel = QProgressBar(), QLabel(), QPushButton("Run"), QPushButton("Cancel")
    for widget in (bar, status, run, cancel):
        qtbot.addWidget(widget)
    cancel.setEnabled(False)
    return bar, status, run, cancel


def test_progress_buttons_and_result(qtbot) -> None:
    bar, status, run, cancel = _widgets(qtbot)
    gate = threading.Event()
    results, ended = [], []

    def job():
        yield Progress(1, 4, "one of four")
        gate.wait(5)
        yield Progress(3, 4, "three of four")
        return "the result"

    running = start_worker(
        job(), progress=bar, status=status, busy=(run,), cancel_button=cancel,
        on_done=results.append, on_finished=lambda: ended.append(run.isEnabled()),
    )  # fmt: skip
    assert running.running and not run.isEnabled() and cancel.isEnabled()
    qtbot.waitUntil(lambda: status.text() == "one of four", timeout=5000)
    assert (bar.value(), bar.maximum()) == (1, 4)
    gate.set()
    qtbot.waitUntil(lambda: not running.running, timeout=5000)
    assert results == ["the result"] and ended == [True]
    assert (bar.value(), status.text()) == (3, "three of four")
    assert run.isEnabled() and not cancel.isEnabled()


def test_an_error_goes_to_the_status_and_the_buttons_come_back(qtbot) -> None:
    bar, status, run, cancel = _widgets(qtbot)

    def job():
        yield Progress(0, 0, "starting")
        raise ValueError("the slide has no um/px")

    running = start_worker(job(), progress=bar, status=status, busy=(run,), cancel_button=cancel)
    qtbot.waitUntil(lambda: not running.running, timeout=5000)
    assert status.text() == "failed: the slide has no um/px"
    assert run.isEnabled() and not cancel.isEnabled()
    assert bar.maximum() == 1  # no longer busy


def test_cancel_sets_the_event_the_job_checks(qtbot) -> None:
    bar, _status, _run, cancel = _widgets(qtbot)
    event = threading.Event()
    results = []

    def job(stop):
        done = 0
        while not stop.is_set() and done < 500:
            done += 1
            yield Progress(done, 500)
            time.sleep(0.01)
        return done

    running = start_worker(
        job, event, progress=bar, cancel_button=cancel, cancel_event=event, on_done=results.append
    )
    qtbot.waitUntil(lambda: bar.value() > 0, timeout=5000)
    assert running.cancel("stopping...") is True
    assert event.is_set() and not cancel.isEnabled()
    assert running.cancel() is False  # once
    qtbot.waitUntil(lambda: not running.running, timeout=5000)
    assert results and results[0] < 500  # the job ended early and returned what it had


def test_cancel_without_an_event_quits_the_worker_and_closes_the_job(qtbot) -> None:
    status = QLabel()
    qtbot.addWidget(status)
    closed = threading.Event()

    def job():
        try:
            for i in range(1000):
                yield Progress(i, 1000)
                time.sleep(0.01)
        finally:
            closed.set()

    running = start_worker(job(), status=status)
    qtbot.waitUntil(lambda: running.worker is not None and running.running, timeout=5000)
    time.sleep(0.05)
    running.cancel()
    assert status.text() == "cancelling..."
    qtbot.waitUntil(lambda: not running.running, timeout=5000)
    qtbot.waitUntil(closed.is_set, timeout=5000)  # the aborted job was closed (it could save)


def test_run_in_thread_calls_back_with_the_value_or_the_error(qtbot) -> None:
    values, errors = [], []
    run_in_thread(lambda a, b: a + b, 2, 3, on_done=values.append)
    run_in_thread(lambda: 1 / 0, on_done=values.append, on_error=errors.append)
    qtbot.waitUntil(lambda: bool(values and errors), timeout=5000)
    assert values == [5] and isinstance(errors[0], ZeroDivisionError)
