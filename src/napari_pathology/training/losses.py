"""The loss hook of :func:`~napari_pathology.training.loop.fit`: what a forward returns, and the default loss.

A family's ``forward(model, x)`` returns the logits alone, a
``(logits, extras)`` pair or a mapping with ``"logits"`` (an attention-MIL
network also returns its instance loss); ``loss(output, targets)`` receives
that output whole, and :func:`logits_of` takes the logits out of it. No Qt,
no napari.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from napari_pathology.training.events import TrainingError

__all__ = ["as_float", "cross_entropy", "logits_of"]


def logits_of(output: Any) -> torch.Tensor:
    """The logits in what a ``forward`` returned: the tensor itself, the first of a pair, or ``["logits"]``.

    Raises
    ------
    TrainingError
        When ``output`` is none of these (one line naming its type).

    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    raise TrainingError(
        "forward must return logits, a (logits, extras) pair or a mapping with 'logits', "
        f"got {type(output).__name__}"
    )


def cross_entropy(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """The default loss: cross-entropy of the logits in ``output``."""
    return F.cross_entropy(logits_of(output), targets)


def as_float(output: Any) -> Any:
    """``output`` with its logits in float32 (the loss is computed in full precision under autocast)."""
    if isinstance(output, torch.Tensor):
        return output.float()
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return (output[0].float(), *output[1:])
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return {**output, "logits": output["logits"].float()}
    return output
