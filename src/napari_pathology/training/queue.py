"""A queue of training jobs: one after another on each device, devices side by side.

:class:`TrainingQueue` runs jobs in threads it owns, one thread per busy
device: jobs submitted for the same device wait their turn; jobs for
different devices (the CPU, ``cuda:0``, ``cuda:1``...) run in parallel.
Each :class:`TrainingJob` has an id, a :class:`JobState`, a stop event that
its generator watches, and the history of the
:class:`~napari_pathology.training.events.TrainEvent` it yielded. Events
and state changes are delivered through per-job callbacks, called from the
queue's threads (a GUI marshals them to its own thread).

Stopping a running job sets its stop event: once training has begun
(after the ``start`` event) the loop finishes the current step, saves and
returns; during set-up (reading slides, computing features), which does not
watch the event, the generator is closed at its next event. A queued job
that is stopped never starts.

Jobs run beside a GUI, so a job whose settings leave ``threads`` unset uses
``threads_per_job`` torch threads (1 by default): on a shared CPU more threads
than free cores make small networks several times slower, and the viewer
stays responsive.

No Qt, no napari.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from napari_pathology.training.events import TrainEvent

__all__ = ["JobState", "TrainingJob", "TrainingQueue", "device_key", "training_queue"]

log = logging.getLogger(__name__)

#: ``factory(stop) -> generator`` of :class:`TrainEvent` returning the job's result.
JobFactory = Callable[[threading.Event], Generator[TrainEvent, None, Any]]
EventCallback = Callable[["TrainingJob", TrainEvent], None]
StateCallback = Callable[["TrainingJob"], None]


class JobState(str, enum.Enum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    STOPPED = "stopped"
    FINISHED = "finished"
    FAILED = "failed"

    @property
    def is_done(self) -> bool:
        """Whether the job will not run (any more)."""
        return self in (JobState.STOPPED, JobState.FINISHED, JobState.FAILED)


def device_key(device: str | None) -> str:
    """The device a job occupies: ``"cpu"`` or ``"cuda:N"`` (bare ``"cuda"`` and ``"auto"`` resolved)."""
    value = (device or "auto").strip().lower()
    if value == "auto":
        from napari_pathology.devices import default_device

        value = default_device()
    if value == "cuda":
        return "cuda:0"
    return value


@dataclass(eq=False)
class TrainingJob:
    """One job of a :class:`TrainingQueue` (made by :meth:`TrainingQueue.submit`).

    Attributes
    ----------
    id : int
        Unique within the process, increasing.
    name : str
        For logs and lists.
    device : str
        The device it occupies (see :func:`device_key`).
    stop_event : threading.Event
        Passed to the generator; :meth:`stop` sets it.
    state : JobState
        Queued, running, stopped, finished or failed.
    result : Any
        What the generator returned (a :class:`~napari_pathology.training.events.TrainResult`).
    error : BaseException or None
        Why the job failed.
    """

    id: int
    name: str
    device: str
    factory: JobFactory = field(repr=False)
    on_event: EventCallback | None = field(default=None, repr=False)
    on_state: StateCallback | None = field(default=None, repr=False)
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False)
    state: JobState = JobState.QUEUED
    result: Any = field(default=None, repr=False)
    error: BaseException | None = None
    _events: list[TrainEvent] = field(default_factory=list, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    @property
    def events(self) -> list[TrainEvent]:
        """A copy of the events yielded so far, in order."""
        with self._lock:
            return list(self._events)

    @property
    def last_event(self) -> TrainEvent | None:
        """The latest event, or None."""
        with self._lock:
            return self._events[-1] if self._events else None

    @property
    def done(self) -> bool:
        """Whether the job is stopped, finished or failed."""
        return self._done.is_set()

    def stop(self) -> None:
        """Ask the job to stop: a running job saves and returns after its step; a queued one never starts."""
        self.stop_event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is done (or ``timeout`` seconds pass); returns whether it is done."""
        return self._done.wait(timeout)

    def _record(self, event: TrainEvent) -> None:
        with self._lock:
            self._events.append(event)
        _call(self.on_event, self, event)

    def _set_state(self, state: JobState) -> None:
        with self._lock:
            self.state = state
        if state.is_done:
            self._done.set()
        _call(self.on_state, self)
        if state.is_done:  # drop the callbacks: they may hold a GUI that should be freed
            self.on_event = self.on_state = None


def _call(callback: Callable[..., None] | None, *args: Any) -> None:
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:  # a broken listener must not kill the job
        log.exception("training queue callback failed")


class TrainingQueue:
    """Runs training jobs: serially per device, in parallel across devices.

    Parameters
    ----------
    threads_per_job : int, optional
        torch CPU threads of a job whose settings leave ``threads`` unset
        (default 1: jobs run beside a GUI); None keeps the usual default.

    Examples
    --------
    >>> queue = TrainingQueue()
    >>> job = queue.submit(lambda stop: train_metastasis(settings, stop), "cpu", name="fine-tune")
    >>> job.wait(); job.state  # doctest: +SKIP
    <JobState.FINISHED: 'finished'>
    """

    def __init__(self, threads_per_job: int | None = 1) -> None:
        self.threads_per_job = threads_per_job
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._jobs: list[TrainingJob] = []
        self._pending: dict[str, deque[TrainingJob]] = {}
        self._threads: dict[str, threading.Thread] = {}

    def submit(
        self,
        factory: JobFactory,
        device: str = "cpu",
        *,
        name: str = "",
        on_event: EventCallback | None = None,
        on_state: StateCallback | None = None,
    ) -> TrainingJob:
        """Queue a job; it starts when its device is free.

        Parameters
        ----------
        factory : callable
            ``factory(stop_event)`` returns the job's generator of :class:`TrainEvent`
            (e.g. ``lambda stop: train_metastasis(settings, stop)``); called on the job's thread.
        device : str
            Where it runs (``"cpu"``, ``"cuda:N"``, ``"auto"``): jobs of one device run one at a time.
        name : str
            For display; ``job <id>`` by default.
        on_event : callable, optional
            ``on_event(job, event)`` for every event, from the queue's thread.
        on_state : callable, optional
            ``on_state(job)`` after every state change, from the queue's thread
            (or the caller's, for the initial ``queued``).

        Returns
        -------
        TrainingJob
        """
        key = device_key(device)
        with self._lock:
            job_id = next(self._ids)
            job = TrainingJob(job_id, name or f"job {job_id}", key, factory, on_event, on_state)
            self._jobs.append(job)
            self._pending.setdefault(key, deque()).append(job)
            start = key not in self._threads
            if start:
                thread = threading.Thread(target=self._drain, args=(key,), name=f"training-{key}")
                self._threads[key] = thread
        _call(on_state, job)
        if start:
            thread.start()
        return job

    @property
    def jobs(self) -> list[TrainingJob]:
        """Every job submitted, oldest first."""
        with self._lock:
            return list(self._jobs)

    def get(self, job_id: int) -> TrainingJob | None:
        """The job with this id, or None."""
        with self._lock:
            return next((job for job in self._jobs if job.id == job_id), None)

    def active(self) -> list[TrainingJob]:
        """Jobs queued or running."""
        return [job for job in self.jobs if not job.done]

    def stop_all(self) -> None:
        """Stop every queued and running job."""
        for job in self.active():
            job.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no job is queued or running (or ``timeout`` seconds pass); returns whether idle."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        for job in self.jobs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not job.wait(left):
                return False
        return True

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop every job and wait for them (see :meth:`wait`)."""
        self.stop_all()
        return self.wait(timeout)

    # ------------------------------------------------------------------ running
    def _drain(self, key: str) -> None:
        """Run the jobs of one device, oldest first, until none is left."""
        while True:
            with self._lock:
                pending = self._pending.get(key)
                if not pending:
                    self._pending.pop(key, None)
                    del self._threads[key]
                    return
                job = pending.popleft()
            self._run(job)

    def _run(self, job: TrainingJob) -> None:
        from napari_pathology.training.loop import default_threads_here

        with default_threads_here(self.threads_per_job):
            self._run_job(job)

    def _run_job(self, job: TrainingJob) -> None:
        if job.stop_event.is_set():
            job._set_state(JobState.STOPPED)
            return
        job._set_state(JobState.RUNNING)
        generator = None
        training = False  # whether the loop (which watches the stop event) has begun
        try:
            generator = job.factory(job.stop_event)
            while True:
                try:
                    event = next(generator)
                except StopIteration as stop:
                    job.result = stop.value
                    break
                job._record(event)
                training = training or event.kind == "start"
                if job.stop_event.is_set() and not training:
                    generator.close()  # set-up does not watch the event: end it here
                    break
        except Exception as error:
            job.error = error
            log.debug("training job %s failed", job.name, exc_info=True)
            job._set_state(JobState.FAILED)
            return
        finally:
            if generator is not None:
                generator.close()
        stopped = getattr(job.result, "stopped", None)
        if stopped is None:
            stopped = job.stop_event.is_set()
        job._set_state(JobState.STOPPED if stopped else JobState.FINISHED)


_DEFAULT_QUEUE: TrainingQueue | None = None
_DEFAULT_LOCK = threading.Lock()


def training_queue() -> TrainingQueue:
    """The process-wide queue the Train panels share (so two viewers do not train on one GPU at once)."""
    global _DEFAULT_QUEUE
    with _DEFAULT_LOCK:
        if _DEFAULT_QUEUE is None:
            _DEFAULT_QUEUE = TrainingQueue()
        return _DEFAULT_QUEUE
