"""Dask plugins of the local clusters the cohort runner starts (imported on the workers by reference)."""

from __future__ import annotations

import signal
import threading
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["IgnoreInterrupt"]


class IgnoreInterrupt(WorkerPlugin):
    """The worker ignores SIGINT: a local cluster's caller decides how its slides stop.

    Ctrl-C in a terminal reaches every process of the group; the caller asks
    the running slides to stop after their batch, which workers killed by the
    same Ctrl-C could not do.
    """

    name = "napari-pathology-ignore-interrupt"

    def setup(self, worker: Any) -> None:
        """Ignore SIGINT in the worker process (its event loop runs in the main thread)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
