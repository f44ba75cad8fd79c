"""The training queue: serial on one device, parallel across devices, stop, failures (fake jobs, fast)."""

from __future__ import annotations

import threading
import time

import pytest

from napari_pathology.training.events import TrainEvent, TrainingError, TrainResult
from napari_pathology.training.queue import JobState, TrainingQueue, device_key

#: Seconds each fake step takes.
STEP = 0.02


def fake_training(log: list, name: str, steps: int = 5, setup: int = 0, fail_at: int | None = None):
    """Factory of trainer-like generators: set-up logs, ``start``, steps (watching stop), ``done``."""

    def factory(stop: threading.Event):
        log.append((name, "begin", time.perf_counter()))
        try:
            for k in range(setup):
                time.sleep(STEP)
                yield TrainEvent("log", 0, steps, message=f"set-up {k}")
            yield TrainEvent("start", 0, steps)
            step = 0
            while step < steps and not stop.is_set():
                time.sleep(STEP)
                step += 1
                if step == fail_at:
                    raise TrainingError(f"{name} broke at step {step}")
                yield TrainEvent("step", step, steps, loss=1.0 / step)
            yield TrainEvent("done", step, steps)
            return TrainResult(None, None, step, step < steps, {})
        finally:
            log.append((name, "end", time.perf_counter()))

    return factory


def spans(log: list) -> dict[str, tuple[float, float]]:
    begin = {name: t for name, what, t in log if what == "begin"}
    return {name: (begin[name], t) for name, what, t in log if what == "end"}


def test_jobs_on_one_device_run_one_after_another() -> None:
    queue, log = TrainingQueue(), []
    states: list[tuple[str, JobState]] = []
    jobs = [
        queue.submit(
            fake_training(log, name),
            "cpu",
            name=name,
            on_state=lambda job: states.append((job.name, job.state)),
        )
        for name in ("a", "b", "c")
    ]
    assert queue.wait(10)
    assert [job.state for job in jobs] == [JobState.FINISHED] * 3
    assert [job.id for job in jobs] == sorted(job.id for job in jobs)
    times = spans(log)
    assert times["a"][1] <= times["b"][0] and times["b"][1] <= times["c"][0]
    assert [s for n, s in states if n == "b"] == [JobState.QUEUED, JobState.RUNNING, JobState.FINISHED]
    assert [e.kind for e in jobs[0].events] == ["start"] + ["step"] * 5 + ["done"]
    assert jobs[0].result.step == 5 and not jobs[0].result.stopped
    assert queue.active() == [] and queue.get(jobs[1].id) is jobs[1]


def test_jobs_on_two_devices_run_in_parallel() -> None:
    queue, log = TrainingQueue(), []
    on_cpu = queue.submit(fake_training(log, "cpu", steps=10), "cpu")
    on_gpu = queue.submit(fake_training(log, "gpu", steps=10), "cuda")  # no GPU needed: nothing runs on it
    assert on_gpu.device == "cuda:0" and on_cpu.device == "cpu"
    assert queue.wait(10)
    times = spans(log)
    assert times["cpu"][0] < times["gpu"][1] and times["gpu"][0] < times["cpu"][1]  # overlapping


def test_stop_a_running_job_and_a_queued_one() -> None:
    queue, log = TrainingQueue(), []
    events: list[TrainEvent] = []
    first_step = threading.Event()

    def on_event(job, event: TrainEvent) -> None:
        events.append(event)
        if event.kind == "step":
            first_step.set()

    running = queue.submit(fake_training(log, "long", steps=1000), "cpu", on_event=on_event)
    waiting = queue.submit(fake_training(log, "next"), "cpu")
    assert first_step.wait(5)
    assert running.state is JobState.RUNNING and waiting.state is JobState.QUEUED
    waiting.stop()
    running.stop()
    assert running.wait(5) and waiting.wait(5)
    assert running.state is JobState.STOPPED and running.result.stopped
    assert running.events[-1].kind == "done" and running.result.step < 1000
    assert waiting.state is JobState.STOPPED and waiting.events == []
    assert "next" not in spans(log)  # never started
    assert events == running.events
    assert running.on_event is None  # callbacks are dropped once done


def test_stop_during_set_up_closes_the_generator() -> None:
    queue, log = TrainingQueue(), []
    job = queue.submit(fake_training(log, "setup", setup=1000), "cpu")
    while not job.events:
        time.sleep(0.005)
    job.stop()
    assert job.wait(5)
    assert job.state is JobState.STOPPED
    assert "start" not in [e.kind for e in job.events]
    assert "setup" in spans(log)  # the generator's finally ran


def test_a_failing_job_does_not_block_the_next() -> None:
    queue, log = TrainingQueue(), []
    failing = queue.submit(fake_training(log, "bad", fail_at=2), "cpu")
    after = queue.submit(fake_training(log, "good"), "cpu")
    assert queue.wait(10)
    assert failing.state is JobState.FAILED and isinstance(failing.error, TrainingError)
    assert "broke at step 2" in str(failing.error)
    assert after.state is JobState.FINISHED


def test_a_broken_callback_does_not_kill_the_job() -> None:
    queue = TrainingQueue()

    def broken(job, event) -> None:
        raise RuntimeError("listener bug")

    job = queue.submit(fake_training([], "x"), "cpu", on_event=broken)
    assert job.wait(5) and job.state is JobState.FINISHED


def test_shutdown_stops_everything() -> None:
    queue = TrainingQueue()
    jobs = [
        queue.submit(fake_training([], f"j{k}", steps=10_000), device)
        for k, device in enumerate(("cpu", "cpu", "cuda:1"))
    ]
    while not jobs[0].events:
        time.sleep(0.005)
    assert queue.shutdown(timeout=5)
    assert all(job.state is JobState.STOPPED for job in jobs)


@pytest.mark.parametrize(("given", "key"), [("cpu", "cpu"), ("cuda", "cuda:0"), ("CUDA:1", "cuda:1")])
def test_device_key(given: str, key: str) -> None:
    assert device_key(given) == key


@pytest.mark.parametrize(("per_job", "expected"), [(1, 1), (None, None)])
def test_jobs_beside_the_gui_default_to_one_torch_thread(per_job, expected) -> None:
    import torch

    from napari_pathology.training.loop import default_threads, torch_threads

    seen = []

    def factory(stop: threading.Event):
        with torch_threads(None):  # as a trainer whose settings leave threads unset
            seen.append(torch.get_num_threads())
            yield TrainEvent("start", 0, 1)
        return TrainResult(None, None, 1, False, {})

    before = torch.get_num_threads()
    queue = TrainingQueue(threads_per_job=per_job)
    job = queue.submit(factory, "cpu")
    assert job.wait(10) and job.state is JobState.FINISHED
    assert seen == [expected or default_threads()]
    assert torch.get_num_threads() == before
