"""CLAM's losses: Berrada et al.'s smooth top-1 SVM, the instance loss choice, and the total loss.

The instance-level clustering loss of CLAM (Lu et al. 2021) is the smooth
top-1 SVM of Berrada, Zisserman and Kumar (ICLR 2018) with temperature
``tau = 1`` and margin ``alpha = 1``, as CLAM configures ``SmoothTop1SVM(n_classes=2)``.
For one sample with scores ``s`` and true class ``y``::

    L(s, y) = tau * log sum_j exp((s_j + alpha * [j != y] - s_y) / tau)

and, where the top score leads the second by at least ``tau * log(1000)``,
the hard multi-class SVM ``max_j (s_j + alpha * [j != y]) - s_y`` instead
(the reference implementation switches there; the two differ by less than
``tau / 1000``). The loss is the mean over the samples.

The total loss of a bag is ``bag_weight * CE(logits, label) + (1 - bag_weight)
* instance_loss`` (0.7 / 0.3 in the paper). No Qt, no napari.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "INSTANCE_LOSSES",
    "clam_loss",
    "instance_loss_fn",
    "smooth_top1_svm",
]

#: Instance-level losses: the paper's smooth top-1 SVM, or cross-entropy.
INSTANCE_LOSSES = ("svm", "ce")
#: Top-1 lead (in units of ``tau``, as a log) beyond which the smooth SVM is evaluated hard.
HARD_THRESHOLD = 1e3


def smooth_top1_svm(
    scores: torch.Tensor, targets: torch.Tensor, tau: float = 1.0, alpha: float = 1.0
) -> torch.Tensor:
    """Smooth top-1 multi-class SVM loss (Berrada et al. 2018), mean over the samples.

    Parameters
    ----------
    scores : Tensor
        ``(B, C)`` class scores.
    targets : Tensor
        ``(B,)`` class indices.
    tau : float
        Temperature of the smoothing (CLAM: 1).
    alpha : float
        Margin (CLAM: 1).

    Returns
    -------
    Tensor
        A scalar; 0 for an empty batch.

    Examples
    --------
    >>> round(float(smooth_top1_svm(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))), 4)  # log 2
    0.6931

    """
    if scores.ndim != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(
            f"scores must be (B, C) and targets (B,), got {tuple(scores.shape)}, {tuple(targets.shape)}"
        )
    scores = scores.float()  # in full precision under autocast too
    if scores.shape[0] == 0:
        return scores.sum() * 0.0
    classes = torch.arange(scores.shape[1], device=scores.device)
    margin = alpha * (targets[:, None] != classes[None, :]).to(scores.dtype)
    truth = scores.gather(1, targets[:, None])
    augmented = scores + margin - truth
    smooth = tau * torch.logsumexp(augmented / tau, dim=1)
    hard = augmented.max(dim=1).values
    top = scores.topk(min(2, scores.shape[1]), dim=1).values
    lead = top[:, 0] - top[:, -1] if scores.shape[1] > 1 else torch.zeros_like(top[:, 0])
    use_hard = (lead >= tau * math.log(HARD_THRESHOLD)).detach()
    return torch.where(use_hard, hard, smooth).mean()


def instance_loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The instance loss called ``name`` (:data:`INSTANCE_LOSSES`): ``loss(scores, targets) -> scalar``."""
    if name == "svm":
        return smooth_top1_svm
    if name == "ce":
        return F.cross_entropy
    raise ValueError(f"instance loss must be one of {', '.join(INSTANCE_LOSSES)}, got {name!r}")


def clam_loss(bag_weight: float = 0.7) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """CLAM's total loss for :func:`~napari_pathology.training.loop.fit`'s ``loss`` hook.

    The returned ``loss(output, targets)`` takes what the CLAM forward hook
    returns, ``(logits (1, C), {"instance_losses": (C,)})`` (the instance
    loss the bag would have under each possible label), and gives
    ``bag_weight * CE + (1 - bag_weight) * instance_losses[label]``. Logits
    alone (no instance losses, e.g. in validation) give the cross-entropy.
    """
    if not (isinstance(bag_weight, int | float) and 0.0 <= float(bag_weight) <= 1.0):
        raise ValueError(f"bag_weight must be in [0, 1], got {bag_weight!r}")
    weight = float(bag_weight)

    def loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
        extras: Mapping[str, Any] = {}
        if isinstance(output, tuple | list):
            logits = output[0]
            extras = output[1] if len(output) > 1 and isinstance(output[1], Mapping) else {}
        elif isinstance(output, Mapping):
            logits, extras = output["logits"], output
        else:
            logits = output
        bag = F.cross_entropy(logits.float(), targets)
        per_label = extras.get("instance_losses")
        if per_label is None:
            return bag
        instance = per_label.float()[targets].mean()
        return weight * bag + (1.0 - weight) * instance

    return loss
