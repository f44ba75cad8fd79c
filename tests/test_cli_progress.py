"""Driving a progress generator: an interrupted drive closes the job at once."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from napari_pathology.cli import run_with_progress
from napari_pathology.progress import Progress, run_to_completion


def job_with_cleanup(log: list[str]) -> Generator[Progress, None, str]:
    try:
        for k in range(5):
            yield Progress(k, 5, f"step {k}")
        return "done"
    finally:
        log.append("closed")


def test_an_interrupt_in_the_callback_closes_the_job_before_it_propagates() -> None:
    log: list[str] = []

    def interrupt(event: Progress) -> None:
        if event.done == 2:
            raise KeyboardInterrupt

    job = job_with_cleanup(log)
    with pytest.raises(KeyboardInterrupt):
        run_to_completion(job, interrupt)
    assert log == ["closed"]  # the job's finally (e.g. saving a partial result) ran at once


def test_a_failing_close_does_not_hide_the_interrupt() -> None:
    def stubborn() -> Generator[Progress, None, None]:
        try:
            yield Progress(0, 1)
        finally:
            raise OSError("disk full while saving")

    def interrupt(event: Progress) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_to_completion(stubborn(), interrupt)


def test_the_result_comes_back_and_the_bar_is_optional() -> None:
    assert run_to_completion(job_with_cleanup([])) == "done"
    assert run_with_progress(job_with_cleanup([]), "test", quiet=True) == "done"
    assert run_with_progress(job_with_cleanup([]), "test") == "done"
