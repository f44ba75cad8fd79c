"""Where a cohort runs: a local dask cluster sized to the machine, or a running scheduler (no Qt).

:func:`open_client` gives a ``distributed.Client``: on a ``LocalCluster`` of
single-threaded worker processes (CPU torch uses one thread per worker), on
one worker per GPU with ``resources={"GPU": 1}`` and its own
``CUDA_VISIBLE_DEVICES``, or on the scheduler at an address (a cluster
started by dask's own deployers: SSH, HPC queues, Kubernetes). A worker that
dies while running a slide is replaced and the slide runs again, up to
``retries`` times (the scheduler's ``allowed_failures``; a running
scheduler keeps its own setting).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["ClusterError", "default_workers", "gpu_count", "open_client"]

#: Seconds to wait for a scheduler at an address before saying it cannot be reached.
CONNECT_TIMEOUT_S = 5.0


class ClusterError(ValueError):
    """The scheduler cannot be reached, or the cluster cannot be started (one line)."""


def gpu_count() -> int:
    """Number of CUDA devices this machine has (0 without torch's CUDA)."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0


def default_workers(device: str = "cpu") -> int:
    """A local cluster sized to the machine: one worker per GPU for CUDA, else one per core (at most 8)."""
    if str(device).startswith("cuda"):
        return max(1, gpu_count())
    return max(1, min(8, os.cpu_count() or 1))


def _gpu_cluster(workers: int, retries: int) -> Any:
    from distributed import Nanny, Scheduler, SpecCluster

    found = gpu_count()
    if found == 0:
        raise ClusterError("--device cuda: this machine has no CUDA device (use --device cpu)")
    if workers > found:
        raise ClusterError(f"--workers {workers}: this machine has {found} GPU(s); one worker runs per GPU")
    specs = {
        f"gpu-{i}": {"cls": Nanny, "options": {
            "nthreads": 1, "resources": {"GPU": 1}, "env": {"CUDA_VISIBLE_DEVICES": str(i)},
        }}
        for i in range(workers)
    }  # fmt: skip
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0", "allowed_failures": retries}}
    return SpecCluster(workers=specs, scheduler=scheduler, silence_logs=40)


@contextlib.contextmanager
def _workers_ignore_interrupt() -> Iterator[None]:
    """Worker processes started in the block inherit an ignored SIGINT (from the main thread only).

    Ctrl-C in a terminal reaches every process of the group; the caller then
    asks the running slides to stop after their batch (they keep what they
    finished), which workers killed by the same Ctrl-C could not do.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def open_client(
    workers: int | None = None,
    scheduler: str | None = None,
    device: str = "cpu",
    retries: int = 2,
    timeout: float | None = None,
) -> Iterator[Any]:
    """A ``distributed.Client`` for a cohort, closed (and its local cluster shut down) on exit.

    Parameters
    ----------
    workers : int, optional
        Local worker processes (default :func:`default_workers`); ignored with ``scheduler``.
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``).
    device : str
        ``cpu``, or ``cuda``/``cuda:N`` for one worker per GPU (resource ``GPU``).
    retries : int
        Times a slide runs again after the worker running it died.
    timeout : float, optional
        Seconds to wait for the scheduler (default :data:`CONNECT_TIMEOUT_S`).

    Raises
    ------
    ClusterError
        The scheduler cannot be reached in ``timeout`` seconds, or no GPU for ``cuda``.
    """
    from distributed import Client, LocalCluster

    cluster = None
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    if scheduler:
        try:
            client = Client(scheduler, timeout=timeout)
        except (OSError, ValueError, TypeError) as error:
            detail = " ".join(str(error).split()) or type(error).__name__
            raise ClusterError(
                f"cannot reach the dask scheduler at {scheduler} within {timeout:g} s ({detail})"
            ) from None
    else:
        n = workers or default_workers(device)
        with _workers_ignore_interrupt():
            if str(device).startswith("cuda"):
                cluster = _gpu_cluster(n, retries)
            else:
                cluster = LocalCluster(
                    n_workers=n, processes=True, threads_per_worker=1, dashboard_address=":0",
                    scheduler_kwargs={"allowed_failures": retries}, silence_logs=40,
                )  # fmt: skip
        client = Client(cluster)
        from napari_pathology.batch._plugins import IgnoreInterrupt

        client.register_plugin(IgnoreInterrupt())  # workers started after a crash too
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close()
