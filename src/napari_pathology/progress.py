"""Progress events shared by every long-running generator.

Long work in napari-pathology (reading, generating, masking, inference,
training) is written as a generator that yields :class:`Progress` events and
returns its result. The GUI runs such a generator with napari's
``thread_worker``; the CLI drives it with a progress bar; scripts call
:func:`run_to_completion`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One step of a long-running job.

    Parameters
    ----------
    done : int
        Units of work finished so far.
    total : int
        Units of work in the whole job (0 when unknown).
    message : str
        Short human-readable description of the current step.
    payload : Any
        Optional data produced by this step (e.g. a finished heatmap block).

    """

    done: int
    total: int
    message: str = ""
    payload: Any = None

    @property
    def fraction(self) -> float:
        """Fraction of the job done, in [0, 1] (0 when the total is unknown)."""
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0


def run_to_completion(
    job: Generator[Progress, None, T],
    on_progress: Callable[[Progress], None] | None = None,
) -> T:
    """Drive a progress generator to its end and return its result.

    Parameters
    ----------
    job : Generator
        A generator yielding :class:`Progress` and returning a result.
    on_progress : callable, optional
        Called with every event, e.g. to update a progress bar.

    Returns
    -------
    Any
        The generator's return value.

    Notes
    -----
    When anything interrupts the drive (an error or Ctrl-C in ``on_progress``,
    say), the job is closed before the exception propagates, so its
    ``finally`` blocks (saving partial results, closing reader threads) run at
    once rather than whenever the generator is garbage-collected. An error
    raised while closing is added as a note to the original, which is the one raised.

    """
    try:
        while True:
            try:
                event = next(job)
            except StopIteration as stop:
                return stop.value
            if on_progress is not None:
                on_progress(event)
    except BaseException as interrupt:
        try:
            job.close()
        except Exception as error:  # the original interruption is what the caller must see
            if hasattr(interrupt, "add_note"):  # Python >= 3.11
                interrupt.add_note(f"closing the job then failed too: {error}")
        raise
