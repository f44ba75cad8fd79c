"""Where a training job runs: its seed and its CPU threads.

:func:`torch_threads` holds torch's CPU threads at the job's setting for its
duration; :func:`default_threads_here` lets a queue beside a GUI lower the
default. No Qt, no napari.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

from napari_pathology.training.events import TrainingError

__all__ = [
    "MAX_DEFAULT_THREADS",
    "default_threads",
    "default_threads_here",
    "seed_everything",
    "torch_threads",
]

#: Most CPU threads a job uses by default (more contend with each other on a shared machine).
MAX_DEFAULT_THREADS = 4


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch (CPU and CUDA) and return a generator for sampling."""
    torch.manual_seed(int(seed))
    return torch.Generator().manual_seed(int(seed))


_JOB_THREADS = threading.local()


@contextlib.contextmanager
def default_threads_here(threads: int | None) -> Iterator[None]:
    """Within the block, on this thread, :func:`default_threads` is ``threads`` (None: unchanged).

    A queue that runs jobs beside a GUI sets 1, so that a job whose settings
    leave ``threads`` unset does not compete with the viewer for the cores.
    """
    previous = getattr(_JOB_THREADS, "threads", None)
    _JOB_THREADS.threads = threads if threads is not None else previous
    try:
        yield
    finally:
        _JOB_THREADS.threads = previous


def default_threads() -> int:
    """CPU threads for a job by default: the usable cores, at most :data:`MAX_DEFAULT_THREADS`.

    Inside :func:`default_threads_here` (a training queue's jobs), its value.
    """
    override = getattr(_JOB_THREADS, "threads", None)
    if override is not None:
        return max(1, int(override))
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_THREADS))


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)`` (None: :func:`default_threads`), then restore.

    On a shared CPU, more threads than free cores make small networks much
    slower (threads wait on each other), so every job sets its own count.
    """
    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise TrainingError(f"threads must be at least 1, got {threads!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)
