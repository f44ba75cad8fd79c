"""How good a nucleus purity classifier is: the validation metrics of training, and evaluation on a slide.

Nucleus AUC, accuracy and cross-entropy over labelled nuclei, and the RMSE of
predicted (mean probability) against true (tumour share) purity over regions.
No Qt, no napari.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_pathology.analysis.metrics import roc_auc
from napari_pathology.families.nucleus_purity.data import LabelledNuclei
from napari_pathology.families.nucleus_purity.regions import group_ids, region_keys, region_purity_rmse
from napari_pathology.models.registry import PathologyModel
from napari_pathology.progress import Progress
from napari_pathology.slide import open_slide
from napari_pathology.tiles import to_tensor
from napari_pathology.training.events import TrainingError

__all__ = ["evaluate_nucleus_purity", "patch_validation"]


def evaluate_nucleus_purity(
    data: LabelledNuclei,
    model: PathologyModel,
    *,
    block_um: float = 200.0,
    min_region_nuclei: int = 20,
    device: str = "cpu",
    batch_size: int = 512,
) -> Generator[Progress, None, dict[str, Any]]:
    """Classify labelled nuclei and measure nucleus AUC and region purity error.

    Regions are the drawn ones (``data.region_ids``), else square blocks of
    ``block_um``; those with at least ``min_region_nuclei`` nuclei count.

    Returns
    -------
    dict
        ``auc`` (NaN with one class), ``purity_rmse``, ``regions``,
        ``nuclei``, ``true_purity`` and ``predicted_purity`` (all nuclei),
        and ``probabilities`` (``(N,)`` float32).

    """
    from napari_pathology.nuclei.classify import classify_nuclei, predicted_purity

    try:
        slide = open_slide(data.slide_path, mpp=data.mpp)
    except Exception as error:
        raise TrainingError(f"{data.slide_path}: {error}") from error
    try:
        probs = yield from classify_nuclei(slide, data.xy_um, model, device=device, batch_size=batch_size)
    finally:
        slide.close()
    groups = group_ids(region_keys(data, block_um))
    rmse, regions = region_purity_rmse(data.is_tumour, probs, groups, min_region_nuclei)
    both = 0 < data.is_tumour.sum() < len(data)
    return {
        "auc": roc_auc(data.is_tumour, probs) if both else math.nan,
        "purity_rmse": rmse,
        "regions": regions,
        "nuclei": len(data),
        "true_purity": float(data.is_tumour.mean()) if len(data) else math.nan,
        "predicted_purity": predicted_purity(probs),
        "probabilities": probs,
    }


def patch_validation(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, normalization: str, positive: int, min_nuclei: int
) -> Callable[[PathologyModel], dict[str, float]]:
    """The validation of training: ``validate(model) -> metrics`` over fixed patches ``x`` of classes ``y``.

    Metrics: ``val_loss`` (cross-entropy, the family's best metric), ``auc``,
    ``accuracy``, and ``purity_rmse`` over the ``groups`` with at least
    ``min_nuclei`` nuclei (``purity_regions`` of them).
    """
    labels = torch.from_numpy(y.astype(np.int64))

    def validate(model: PathologyModel) -> dict[str, float]:
        device = next(model.parameters()).device
        logits = torch.cat(
            [
                model(to_tensor(x[i : i + 1024], normalization, device)).float().cpu()
                for i in range(0, len(x), 1024)
            ]
        )
        probs = torch.softmax(logits, 1)[:, positive].numpy()
        loss = float(F.cross_entropy(logits, labels))
        rmse, regions = region_purity_rmse(y == positive, probs, groups, min_nuclei)
        metrics = {
            "val_loss": loss,
            "auc": roc_auc(y == positive, probs),
            "accuracy": float(((probs >= 0.5) == (y == positive)).mean()),
            "purity_rmse": rmse,
            "purity_regions": regions,
        }
        return metrics

    return validate
