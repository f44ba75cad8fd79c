"""napari reader contribution: whole-slide images as lazy multiscale layers.

``napari_get_reader`` probes by file name only (no I/O) and returns ``None``
for files no backend reads, so napari can try other plugins. For a file of a
supported kind that turns out to be broken, the reader shows one clear
notification naming the file and the cause and returns napari's "nothing to
add" sentinel: no traceback dialog, and the viewer keeps working.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from napari_pathology._layers import LayerData, slide_layer_data
from napari_pathology.slide import (
    Slide,
    SlideOpenError,
    SlideReadError,
    is_supported_path,
    open_slide,
)

PathOrPaths = str | Sequence[str]

#: napari's sentinel for "read fine, no layers to add".
NO_LAYERS: list[tuple[None]] = [(None,)]


def napari_get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list] | None:
    """Return :func:`read_slides` when every path has a supported ending, else None."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths or not all(is_supported_path(p) and not Path(p).is_dir() for p in paths):
        return None
    return read_slides


def read_slides(path: PathOrPaths) -> list:
    """Open each slide as a multiscale RGB layer; report broken files as notifications."""
    from napari.utils.notifications import show_error, show_warning

    paths = [path] if isinstance(path, str | Path) else list(path)
    layers: list[LayerData] = []
    for one in paths:
        try:
            slide = open_slide(one)
            slide.validate()
        except SlideOpenError as exc:  # includes unsupported contents behind a known ending
            show_error(str(exc))
            continue
        announce_restored_mpp(slide)
        for warning in slide.warnings:  # e.g. pyramid levels a truncated file lost
            show_warning(f"{slide.name}: {warning}")
        if slide.brightfield is False:
            show_warning(
                f"{slide.name} looks like a fluorescence (dark-field) slide: it can be viewed, but the "
                "H&E models and tissue masks do not apply to it."
            )
        if slide.mpp is None:
            show_warning(
                f"{slide.name}: {slide.backend.mpp_note}. Showing it in pixels; set um/px in the "
                "Slide panel so measurements and models use true sizes."
            )
        layers.append(slide_layer_data(slide, on_error=_read_error_reporter(slide.name)))
    return layers or NO_LAYERS


def announce_restored_mpp(slide: Slide) -> None:
    """Say that :func:`open_slide` applied the um/px the user set for this slide earlier.

    Annotations saved then are in that um/px's micrometres, which is why it is restored.
    """
    from napari.utils.notifications import show_info

    if slide.mpp_restored_from is not None:
        show_info(
            f"{slide.name}: restored the um/px you set, {slide.mpp[0]:g} um/px (kept in "
            f'{slide.mpp_restored_from}); press "Use file\'s" in the Slide panel to forget it.'
        )


def _read_error_reporter(name: str) -> Callable[[SlideReadError], None]:
    """One warning per slide for tiles that fail to decode while drawing."""
    reported = threading.Event()

    def report(error: SlideReadError) -> None:
        if reported.is_set():
            return
        reported.set()
        from napari.utils.notifications import show_warning

        show_warning(f"{error} Unreadable parts of {name} are shown grey.")

    return report
