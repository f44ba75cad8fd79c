"""Measure the shipped whole-slide CNN demo (``wholeslide-demo``) on synthetic slides it never saw.

    python scripts/evaluate_wholeslide_demo.py [--work DIR] [--seed 1] [--per-class 10]
        [--micro-fraction 0.3] [--size 4096] [--model wholeslide-demo]

A cohort of ``--per-class`` normal, tumour type A and tumour type B slides
(``write_subtype_cohort``, binary labels normal / tumour) is written with a
seed the training script did not use (its slides are ``seed * 1000 + 3k + c``:
seed 1 shares none with seed 0's); ``--micro-fraction`` of each tumour class
gets one micro lesion (about 0.2-0.6 mm, scaled to the slide) instead of 1-3
macro lesions. Each slide goes through what ``napari-pathology run SLIDE
--model wholeslide-demo`` does: tissue found with the default parameters
(``tissue_or_detect``), then the family's slide runner (``analysis.runners.run``:
the tissue's bounding box read at the spec's um/px, run tile by tile).
Reported:

- slide AUC of P(tumour) (for a subtype model, 1 - P(normal)), tumour (type A or B) vs normal, with its 95%
  stratified bootstrap and DeLong intervals
  (:func:`napari_pathology.analysis.metrics.slide_auc`), over all slides and
  over the normal + macro-lesion slides; accuracy of argmax;
- on each tumour slide, whether the maximum of the (likeliest) tumour class's activation
  map (``class_heatmaps``; ``heatmap`` holds the predicted class's) lies in
  the planted tumour: ``strict`` when the CAM cell's centre is inside the
  truth polygons, ``within one cell`` when the 3 x 3 CAM cells around it
  hold tumour in the truth mask (``OUT.tumour.png``); as fractions with a
  bootstrap 95% interval, and the share of the tissue's CAM cells inside the
  tumour (what a random pick would give).

A markdown table for the README is printed; everything is written to
``WORK/wholeslide-demo-metrics.json``. About 2 minutes on 2 CPU cores for 30
slides (cohort generation included).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from napari_pathology.analysis.jobs import tissue_or_detect
from napari_pathology.analysis.metrics import bootstrap_ci, slide_auc
from napari_pathology.analysis.runners import run
from napari_pathology.analysis.settings import RunSettings
from napari_pathology.cohort import read_slide_table
from napari_pathology.geometry import points_in_polygons
from napari_pathology.models import resolve_model
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import open_slide
from napari_pathology.slide.synthetic import load_truth, truth_paths, write_subtype_cohort

DEMO = "wholeslide-demo"


def tumour_mask(slide_path: Path) -> tuple[np.ndarray, float]:
    """The truth's tumour mask (bool, pixel ``(i, j)`` centred at ``(i + .5) * mpp``) and its um/px."""
    truth = load_truth(slide_path)
    mask = np.asarray(Image.open(truth_paths(slide_path)["tumour_png"])) > 127
    return (mask if mask.ndim == 2 else mask[..., 0]), float(truth["mask_mpp"])


def cam_hits(result: Any, index: int, polygons: list, mask: np.ndarray, mask_mpp: float) -> dict[str, Any]:
    """Where the tumour class's CAM peaks, against the planted tumour (see the module)."""
    cam = np.asarray(result.class_heatmaps[index], float)
    r, c = np.unravel_index(np.nanargmax(cam), cam.shape)
    cell = float(result.cell_um)
    y, x = (float(result.first_centre_um[0]) + r * cell, float(result.first_centre_um[1]) + c * cell)
    strict = bool(points_in_polygons(np.array([[x, y]]), polygons)[0] >= 0) if polygons else False
    # mask pixels whose centre lies in the 3 x 3 cells around the peak
    lo_y, hi_y = (y - 1.5 * cell) / mask_mpp - 0.5, (y + 1.5 * cell) / mask_mpp - 0.5
    lo_x, hi_x = (x - 1.5 * cell) / mask_mpp - 0.5, (x + 1.5 * cell) / mask_mpp - 0.5
    rows = slice(max(0, int(np.ceil(lo_y))), max(0, int(np.floor(hi_y)) + 1))
    cols = slice(max(0, int(np.ceil(lo_x))), max(0, int(np.floor(hi_x)) + 1))
    near = bool(mask[rows, cols].any())
    # the share of computed cells whose centre is in the tumour: a random pick's chance
    rr, cc = np.nonzero(np.isfinite(cam))
    centres = np.column_stack([result.first_centre_um[1] + cc * cell, result.first_centre_um[0] + rr * cell])
    chance = float(np.mean(points_in_polygons(centres, polygons) >= 0)) if polygons else 0.0
    return {"cam_peak_um": [x, y], "cam_in_tumour": strict, "cam_within_one_cell": near,
            "cells_in_tumour": chance}  # fmt: skip


def evaluate(model: Any, entries: list[Any], settings: RunSettings) -> list[dict[str, Any]]:
    """One row per slide: label, lesion size, P(tumour), prediction and the CAM peak's place."""
    classes = list(model.spec.classes)
    tumours = [k for k, name in enumerate(classes) if name != "normal"]  # tumour, or its subtypes
    rows = []
    for k, entry in enumerate(entries):
        truth = load_truth(entry.path)
        with open_slide(entry.path) as slide:
            tissue = run_to_completion(tissue_or_detect(slide))
            result = run_to_completion(run(slide, model, tissue=tissue, settings=settings))
            polygons = entry.tumour_polygons_um(slide.mpp) if entry.annotations else []
        row = {
            "slide": entry.path.name, "label": entry.label,
            "lesions": None if entry.label == "normal" else truth["options"]["tumour_size"],
            "tumour_type": truth.get("tumour_type"),
            "p_tumour": float(sum(result.scores[classes[k]] for k in tumours)),  # 1 - P(normal)
            "predicted": classes[int(np.argmax([result.scores[c] for c in classes]))],
            "cam_shape": list(result.heatmap.shape), "cell_um": float(result.cell_um),
        }  # fmt: skip
        if entry.label != "normal":
            tumour = max(tumours, key=lambda k: result.scores[classes[k]])  # the likeliest tumour class's map
            row.update(cam_hits(result, tumour, polygons, *tumour_mask(entry.path)))
        rows.append(row)
        hit = "" if entry.label == "normal" else f", CAM max in tumour {row['cam_within_one_cell']}"
        print(f"{k + 1}/{len(entries)} {entry.path.name}: P(tumour) {row['p_tumour']:.3f}{hit}", flush=True)
    return rows


def _auc(rows: list[dict[str, Any]]) -> dict[str, Any]:
    truth = np.array([r["label"] != "normal" for r in rows])
    auc = slide_auc(truth, np.array([r["p_tumour"] for r in rows]))
    return {"auc": auc.to_dict(), "text": str(auc), "slides": len(rows)}


def _share(values: list[bool]) -> dict[str, Any]:
    x = np.asarray(values, float)
    low, high = bootstrap_ci(np.mean, x) if len(x) > 1 else (float("nan"), float("nan"))
    return {"fraction": float(x.mean()) if len(x) else float("nan"), "ci95": [low, high],
            "hits": int(x.sum()), "slides": len(x)}  # fmt: skip


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline numbers (see the module)."""
    truth = np.array([r["label"] != "normal" for r in rows])
    predicted = np.array([r["predicted"] != "normal" for r in rows])  # any tumour class
    tumour = [r for r in rows if r["label"] != "normal"]
    summary: dict[str, Any] = {
        "all": _auc(rows),
        "accuracy": float(np.mean(predicted == truth)),
        "sensitivity": float(predicted[truth].mean()), "specificity": float((~predicted[~truth]).mean()),
        "cam_within_one_cell": _share([r["cam_within_one_cell"] for r in tumour]),
        "cam_in_tumour_strict": _share([r["cam_in_tumour"] for r in tumour]),
        "cells_in_tumour_mean": float(np.mean([r["cells_in_tumour"] for r in tumour])),
    }  # fmt: skip
    for size in ("macro", "micro"):
        subset = [r for r in tumour if r["lesions"] == size]
        if subset:
            summary[size] = {
                **_auc([r for r in rows if r["label"] == "normal"] + subset),
                "detected": float(np.mean([r["predicted"] != "normal" for r in subset])),
                "cam_within_one_cell": _share([r["cam_within_one_cell"] for r in subset]),
            }
    return summary


def markdown(summary: dict[str, Any], rows: list[dict[str, Any]], seed: int) -> str:
    """The README table: one line for all slides, one per lesion size present."""
    normal = sum(r["label"] == "normal" for r in rows)
    lines = [
        "| slides (seed " + str(seed) + ") | slide AUC | 95% CI (bootstrap) | 95% CI (DeLong) | accuracy "
        "| CAM max in the tumour (within one cell) | strict | random cell |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cam = summary["cam_within_one_cell"]
    parts = [("all", summary["all"])] + [(s, summary[s]) for s in ("macro", "micro") if s in summary]
    for name, part in parts:
        auc = part["auc"]
        what = f"{len(rows)}: {normal} normal, {len(rows) - normal} tumour" if name == "all" else (
            f"{normal} normal + {part['slides'] - normal} {name}-lesion tumour")  # fmt: skip
        hits = cam if name == "all" else part["cam_within_one_cell"]
        ci = f"{hits['ci95'][0]:.2f}-{hits['ci95'][1]:.2f}"
        extra = (
            [f"{summary['accuracy']:.2f}", f"{hits['hits']} of {hits['slides']} ({ci})",
             f"{summary['cam_in_tumour_strict']['hits']} of {summary['cam_in_tumour_strict']['slides']}",
             f"{summary['cells_in_tumour_mean']:.2f}"]
            if name == "all" else
            [f"detected {part['detected']:.2f}", f"{hits['hits']} of {hits['slides']} ({ci})", "", ""]
        )  # fmt: skip
        cells = [what, f"{auc['auc']:.3f}", "{:.3f}-{:.3f}".format(*auc["bootstrap_ci"]),
                 "{:.3f}-{:.3f}".format(*auc["delong_ci"]), *extra]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Write the unseen cohort, run the model on every slide, print and save the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("build/wholeslide-demo"))
    parser.add_argument("--seed", type=int, default=1, help="cohort seed (the demo was trained on 0)")
    parser.add_argument("--per-class", type=int, default=10, help="normal, type A and type B slides each")
    parser.add_argument("--micro-fraction", type=float, default=0.3, help="tumour slides with a micro lesion")
    parser.add_argument("--size", type=int, default=4096, help="slide side in px at 0.5 um/px")
    parser.add_argument("--model", default=DEMO, help="registered name or checkpoint")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    folder = args.work / f"eval-seed{args.seed}"
    table = write_subtype_cohort(
        folder, args.per_class, args.seed, size=args.size, micro_fraction=args.micro_fraction, subtypes=False
    )
    entries = read_slide_table(table, classes=("normal", "tumour"))
    model = resolve_model(args.model)
    rows = evaluate(model, entries, RunSettings(device=args.device))
    summary = summarise(rows)
    command = "python scripts/evaluate_wholeslide_demo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": command, "model": args.model, "description": model.spec.description, "seed": args.seed,
        "per_class": args.per_class, "micro_fraction": args.micro_fraction, "size_px": args.size,
        "summary": summary, "slides_detail": rows,
    }  # fmt: skip
    out = args.work / "wholeslide-demo-metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({"command": command, **summary}, indent=1))
    print()
    print(markdown(summary, rows, args.seed))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
