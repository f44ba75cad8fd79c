"""Score a model on a cohort of slides with ground truth: slide AUC, FROC, TPF vs purity.

:func:`evaluate_cohort` runs the model on every slide of a slide table
through the cohort runner (:mod:`napari_pathology.batch`: results saved per
slide, done slides reused, in this process or on dask workers), then
:func:`evaluate_reports` scores the saved results: it
computes the slide-level AUC with its bootstrap and DeLong 95% CIs from the
slide scores, the FROC (Camelyon16 rules) from the detections and the
tumour polygons, and, where the ground truth gives a tumour purity
(synthetic slides), Pearson's r between the slide score and that purity.

No Qt, no napari.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.analysis.engine import RunSettings
from napari_pathology.analysis.metrics import (
    AUCResult,
    FROCResult,
    SlideDetections,
    froc,
    pearson_r,
    slide_auc,
)
from napari_pathology.analysis.result import load_result
from napari_pathology.cohort import SlideEntry
from napari_pathology.fileio import atomic_write, ensure_writable_dir, safe_name
from napari_pathology.progress import Progress
from napari_pathology.tissue import TissueParams

__all__ = ["Evaluation", "SlideOutcome", "evaluate_cohort", "evaluate_reports"]


@dataclass
class SlideOutcome:
    """One slide's score, detections and truth."""

    name: str
    label: str | None
    is_tumour: bool | None
    slide_score: float
    detections: np.ndarray
    lesions: list[np.ndarray]
    purity: float | None
    result_dir: Path
    path: str = ""


@dataclass
class Evaluation:
    """A model's results on a cohort."""

    model: str
    outcomes: list[SlideOutcome]
    auc: AUCResult | None = None
    froc: FROCResult | None = None
    purity_r: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (per-slide rows included)."""
        return {
            "model": self.model,
            "n_slides": len(self.outcomes),
            "slide_auc": self.auc.to_dict() if self.auc else None,
            "froc": self.froc.to_dict() if self.froc else None,
            "score_vs_purity": {"pearson_r": self.purity_r[0], "p": self.purity_r[1]}
            if self.purity_r
            else None,
            "notes": self.notes,
            "failed": self.failed,
            "slides": [_row(o) for o in self.outcomes],
        }

    def summary(self) -> str:
        """A few lines for the terminal and the README."""
        lines = [f"{self.model} on {len(self.outcomes)} slides"]
        if self.auc:
            lines.append(f"slide {self.auc}")
        if self.froc:
            lines.append(f"FROC {self.froc.score:.3f}, sensitivity at 8 FP {self.froc.sensitivity_at(8):.3f}")
        if self.purity_r:
            lines.append(
                f"slide score vs tumour purity: Pearson r {self.purity_r[0]:.3f} (p {self.purity_r[1]:.2g})"
            )
        lines += self.notes
        return "\n".join(lines)


def _row(o: SlideOutcome) -> dict[str, Any]:
    return {
        "slide": o.name,
        "path": o.path,
        "label": o.label,
        "slide_score": o.slide_score,
        "detections": len(o.detections),
        "lesions": len(o.lesions),
        "purity": o.purity,
    }


def _purity(entry: SlideEntry) -> float | None:
    """Tumour nuclei / all nuclei from a synthetic slide's ground truth, None without one."""
    from napari_pathology.slide.synthetic import load_truth

    try:
        data = load_truth(entry.path)
        return float(data["n_tumour_nuclei"]) / max(1.0, float(data["n_nuclei"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evaluate_cohort(
    model: Any,
    entries: Sequence[SlideEntry],
    out_dir: str | os.PathLike[str],
    settings: RunSettings | None = None,
    tissue_params: TissueParams | None = None,
    *,
    workers: int = 1,
    scheduler: str | None = None,
    force: bool = False,
    classes: Sequence[str] | None = None,
) -> Generator[Progress, None, Evaluation]:
    """Run ``model`` on every slide and score it against the slides' labels and annotations.

    The slides run through the cohort runner (:func:`napari_pathology.batch.run_cohort`):
    in this process with one worker, else on a local dask cluster (or the
    scheduler at ``scheduler``); slides done by an earlier run are reused
    (their done markers), a slide that fails is named in the notes and left
    out of the metrics.

    Parameters
    ----------
    model : PathologyModel, str or path-like
        The model to evaluate (a registry name or checkpoint for a cluster).
    entries : sequence of SlideEntry
        Slides with labels (for AUC) and tumour polygons (for FROC).
    out_dir : path-like
        Results per slide (``OUT/<slide>/<model>``), ``evaluation.json`` and ``slides.csv``.
    settings : RunSettings, optional
        Engine settings (device, batch size, TTA, NMS).
    tissue_params : TissueParams, optional
        Tissue detection.
    workers : int
        1: in this process; more: a local dask cluster of that many worker processes.
    scheduler : str, optional
        Address of a running dask scheduler.
    force : bool
        Recompute slides that are done.
    classes : sequence of str, optional
        Class names of another tool's checkpoint (when ``model`` is a path).

    Yields
    ------
    Progress
        One step per slide (messages carry the engine's progress).
    """
    from napari_pathology.batch import run_cohort

    cohort = yield from run_cohort(
        entries, model, out_dir, settings=settings, tissue_params=tissue_params or TissueParams(),
        workers=workers, scheduler=scheduler, in_process=workers <= 1 and not scheduler, force=force,
        classes=classes, evaluate=False,
    )  # fmt: skip
    output = getattr(getattr(model, "spec", None), "output", None)
    if output is None:
        from napari_pathology.batch.tasks import cached_model

        output = cached_model(os.fspath(model), tuple(classes) if classes else None).spec.output
    evaluation = evaluate_reports(cohort.job, output, entries, cohort.reports, out_dir)
    return evaluation


def evaluate_reports(
    model_name: str,
    output: str,
    entries: Sequence[SlideEntry],
    reports: Sequence[Any],
    out_dir: str | os.PathLike[str],
) -> Evaluation:
    """Score a cohort's saved results against the slides' labels, annotations and purity; write the files.

    Parameters
    ----------
    model_name : str
        The model's name (names the files).
    output : str
        The model's output kind (``heatmap`` results get a FROC).
    entries : sequence of SlideEntry
        The slide table.
    reports : sequence of SlideReport
        The runner's report per slide (:class:`napari_pathology.batch.SlideReport`):
        done slides are loaded from their result folders, failed ones named in the notes.
    out_dir : path-like
        Where ``evaluation-<model>.json`` and ``slides-<model>.csv`` go.
    """
    by_path = {os.path.abspath(os.fspath(r.slide)): r for r in reports}
    outcomes, failed = [], []
    for entry in entries:
        report = by_path.get(os.path.abspath(os.fspath(entry.path)))
        if report is None or report.status not in ("done", "skipped"):
            failed.append(f"{entry.path.name} ({report.error or report.status if report else 'not run'})")
            continue
        result = load_result(report.output)
        lesions = (
            [polygon[0] for polygon in entry.tumour_polygons_um(result.slide_mpp)]
            if entry.annotations
            else []
        )
        outcomes.append(SlideOutcome(
            entry.name, entry.label, entry.is_tumour, float(result.slide_score), result.detections, lesions,
            _purity(entry), Path(report.output), str(result.slide_path or entry.path),
        ))  # fmt: skip
    evaluation = Evaluation(model_name, outcomes, failed=failed)
    if failed:
        shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        evaluation.notes.append(f"{len(failed)} of {len(entries)} slides failed and are not scored: {shown}")
    labelled = [o for o in outcomes if o.is_tumour is not None and np.isfinite(o.slide_score)]
    labels = np.array([o.is_tumour for o in labelled], bool)
    left_out = [Path(o.path).name if o.path else o.name for o in outcomes if o not in labelled]
    if left_out:  # said, never silently dropped from the AUC
        shown = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
        evaluation.notes.append(
            f"{len(left_out)} of {len(outcomes)} slides have no tumour/normal label (or no finite score) "
            f"and are not in the slide AUC: {shown}"
        )
    if labelled and 0 < labels.sum() < len(labels):
        evaluation.auc = slide_auc(labels, np.array([o.slide_score for o in labelled]))
    else:
        evaluation.notes.append("slide AUC needs tumour and normal slides with labels")
    if output == "heatmap" and any(o.lesions for o in outcomes) and any(not o.lesions for o in labelled):
        evaluation.froc = froc([SlideDetections(o.name, o.detections, o.lesions) for o in labelled])
    with_purity = [o for o in outcomes if o.purity is not None and np.isfinite(o.slide_score)]
    if len(with_purity) >= 3:
        evaluation.purity_r = pearson_r([o.slide_score for o in with_purity], [o.purity for o in with_purity])
    _write(evaluation, ensure_writable_dir(out_dir))
    return evaluation


def _write(evaluation: Evaluation, out_dir: Path) -> None:
    """``evaluation-<model>.json`` and ``slides-<model>.csv`` (a row per slide, with its path), atomically."""
    name = safe_name(evaluation.model, fallback="model")
    text = json.dumps(evaluation.to_dict(), indent=2, default=float)
    atomic_write(out_dir / f"evaluation-{name}.json", text)

    def rows(fh: Any) -> None:
        writer = csv.writer(fh)
        writer.writerow(["slide", "path", "label", "slide_score", "detections", "lesions", "purity"])
        for o in evaluation.outcomes:
            writer.writerow([o.name, o.path, o.label or "", f"{o.slide_score:.6g}", len(o.detections),
                             len(o.lesions), "" if o.purity is None else f"{o.purity:.4f}"])  # fmt: skip

    atomic_write(out_dir / f"slides-{name}.csv", rows, text=True)
