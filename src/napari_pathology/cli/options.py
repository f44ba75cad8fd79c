"""The argparse ``type=`` factories and the option ranges, one per kind of option.

Every numeric option is parsed by one of these factories, so a bad value (0
where 1 is the least, NaN, 1e9 px, an implausible um/px) is refused in one
line by the parser, before anything is read or computed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from napari_pathology.fileio import require_finite


def int_option(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` for a whole number in ``[minimum, maximum]``."""

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            high = "" if maximum is None else f" and at most {maximum}"
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{high}, got {text!r}")
        return value

    parse.__name__ = "whole number"
    return parse


def finite_float(
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
    unit: str = "",
) -> Callable[[str], float]:
    """An argparse ``type`` for a finite number in a range (ends open when asked).

    Built on :func:`napari_pathology.fileio.require_finite`; NaN and
    infinities are refused.
    """
    low = "-inf" if minimum is None else f"{minimum:g}"
    high = "inf" if maximum is None else f"{maximum:g}"
    interval = f"{'(' if exclusive_minimum else '['}{low}, {high}{')' if exclusive_maximum else ']'}"
    suffix = f" {unit}" if unit else ""

    def parse(text: str) -> float:
        try:
            value = require_finite(text, "value", minimum=minimum, maximum=maximum)
        except ValueError as error:
            if "finite" in str(error) or "must be a number" in str(error):
                raise argparse.ArgumentTypeError(str(error).removeprefix("value ")) from None
            value = None
        if (
            value is None
            or (exclusive_minimum and minimum is not None and value <= minimum)
            or (exclusive_maximum and maximum is not None and value >= maximum)
        ):
            raise argparse.ArgumentTypeError(f"must be in {interval}{suffix}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


#: Whole number of at least 1 (counts, sizes, steps).
positive_int = int_option(1)
#: Whole number of at least 0.
non_negative_int = int_option(0)
#: Random seeds: what numpy and torch both accept.
seed_int = int_option(0, 2**32 - 1)
#: A share in [0, 1].
fraction = finite_float(0.0, 1.0)
#: A finite number above 0.
positive_float = finite_float(0.0, exclusive_minimum=True)


def mpp_option(text: str) -> float:
    """An argparse ``type`` for um/px: finite and plausible for a microscope slide.

    The range is the one slides' own metadata must fall in
    (:data:`napari_pathology.slide.backends.PLAUSIBLE_MPP`).
    """
    from napari_pathology.slide.backends import PLAUSIBLE_MPP

    low, high = PLAUSIBLE_MPP
    return finite_float(low, high, unit="um/px, the plausible range for a slide")(text)


def device_option(text: str) -> str:
    """An argparse ``type`` for ``--device``: refused at once when no such device is here.

    ``cpu`` and ``auto`` pass without importing torch; anything else is
    checked by :func:`napari_pathology.devices.resolve_device`.
    """
    if str(text).strip().lower() in ("cpu", "auto"):
        return str(text).strip().lower()
    from napari_pathology.devices import resolve_device

    try:
        resolve_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return str(text).strip().lower()


#: Option ranges, one per kind of option.
SLIDE_SIZE = int_option(256, 100_000)  # synthetic slide side, px
SYNTH_MPP = finite_float(0.05, 10.0, unit="um/px")  # what generate_synthetic_slide renders
MASK_MPP = finite_float(0.1, 1000.0, unit="um/px")
CHUNK_PX = int_option(64, 8192)
BATCH_SIZE = int_option(1, 4096)
STRIDE = int_option(1, 4096)  # px at the model's um/px; a tile is at most a few hundred
NMS_RADIUS = finite_float(0.0, 1000.0, exclusive_minimum=True, unit="heatmap cells")
TRAIN_STEPS = int_option(1, 10_000_000)
EPOCHS = int_option(1, 100_000)
TRAIN_BATCH_SIZE = int_option(1, 65_536)
LEARNING_RATE = finite_float(0.0, 10.0, exclusive_minimum=True)
VAL_FRACTION = finite_float(0.0, 1.0, exclusive_maximum=True)
NORMAL_WEIGHT = finite_float(0.0, 1000.0, exclusive_minimum=True)
