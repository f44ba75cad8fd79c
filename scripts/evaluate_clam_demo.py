"""Measure the shipped CLAM demo models on synthetic slides no model saw.

    python scripts/evaluate_clam_demo.py [--work DIR] [--seed 1] [--per-class 7] [--size 4096] [--top-k 4]

A subtyping cohort of ``--per-class`` normal, tumour type A and tumour type B
slides is written with a seed the training script did not use (its slides
are ``seed * 1000 + 3k + c``: seed 1 shares none with seed 0's). Each slide
is processed as Run processes it: tissue found with the default parameters,
every patch with Run's least tissue share through the encoder the model's
spec names, at the spec's patch size and um/px, and the bag through the
network once. Reported:

- ``clam-demo``: slide AUC of P(tumour), tumour (type A or B) vs normal
  slides, with its 95% bootstrap (stratified) and DeLong intervals
  (:func:`napari_pathology.analysis.metrics.slide_auc`), and the accuracy of
  argmax;
- ``clam-subtype-demo``: balanced accuracy (mean recall of normal,
  tumour_a, tumour_b) with a stratified 95% bootstrap interval, and the
  confusion matrix;
- for each model, on the tumour slides: the share of the ``--top-k`` most
  attended patches (raw attention of the predicted class's branch, as the
  heatmap shows) whose centre lies inside the planted tumour polygons of the
  truth GeoJSON, next to the best share possible (a slide with fewer than
  k patches inside its tumour caps it), the share of slides whose most
  attended patch is inside, and the share of all tissue patches inside them
  (what a random pick would give).

Results are printed and written to ``WORK/clam-demo-metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_pathology.analysis.jobs import tissue_or_detect
from napari_pathology.analysis.metrics import bootstrap_ci, slide_auc
from napari_pathology.analysis.settings import RunSettings
from napari_pathology.cohort import read_slide_table
from napari_pathology.features import extract_features, get_encoder
from napari_pathology.geometry import points_in_polygons
from napari_pathology.models import resolve_model
from napari_pathology.progress import run_to_completion
from napari_pathology.slide import open_slide
from napari_pathology.slide.synthetic import write_subtype_cohort
from napari_pathology.slide.synthetic.truth import SUBTYPE_LABELS


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels``."""
    return float(np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)]))


def _features(slide: Any, spec: Any, cache: Path, encoders: dict) -> Any:
    """The slide's patch features for a model, as Run extracts them (cached across models)."""
    key = (spec.config["encoder"], spec.config.get("encoder_weights"), spec.input_size, spec.mpp)
    if key not in encoders:
        encoders[key] = get_encoder(key[0], weights=key[1])
    tissue = run_to_completion(tissue_or_detect(slide))
    job = extract_features(
        slide, encoders[key], tissue=tissue, min_tissue_fraction=RunSettings().min_tissue_fraction,
        patch_size=spec.input_size, mpp=spec.mpp, cache_dir=cache,
    )  # fmt: skip
    return run_to_completion(job)


def evaluate(models: dict[str, Any], entries: list[Any], cache: Path, top_k: int) -> dict[str, Any]:
    """Per-slide probabilities and attention hits of each model; returns the rows."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    encoders: dict = {}
    for k, entry in enumerate(entries):
        slide = open_slide(entry.path)
        polygons = entry.tumour_polygons_um(slide.mpp) if entry.annotations else []
        for name, model in models.items():
            feats = _features(slide, model.spec, cache, encoders)
            with torch.no_grad():
                out = model.net.eval().run(torch.from_numpy(feats.features))
            probabilities = out.probabilities[0].numpy()
            predicted = int(probabilities.argmax())
            attention = out.class_attention(predicted).numpy()
            inside = points_in_polygons(feats.grid.centres_um, polygons) >= 0 if polygons else None
            top = np.argsort(-attention)[:top_k]
            rows[name].append({
                "slide": entry.path.name, "label": entry.label, "probabilities": probabilities.tolist(),
                "predicted": model.spec.classes[predicted], "patches": len(feats),
                "top_k_inside": None if inside is None else float(inside[top].mean()),
                "top_1_inside": None if inside is None else bool(inside[top[0]]),
                "best_possible": None if inside is None else min(len(top), int(inside.sum())) / len(top),
                "all_inside": None if inside is None else float(inside.mean()),
            })  # fmt: skip
        print(f"{k + 1}/{len(entries)} {entry.path.name}: " + ", ".join(
            f"{name} {row[-1]['predicted']}" for name, row in rows.items()
        ))  # fmt: skip
    return rows


def _localisation(rows: list[dict[str, Any]]) -> dict[str, Any]:
    tumour = [r for r in rows if r["label"] != "normal" and r["top_k_inside"] is not None]
    shares = np.array([r["top_k_inside"] for r in tumour])
    low, high = bootstrap_ci(np.mean, shares)
    return {
        "top_k_inside": float(shares.mean()), "top_k_inside_ci95": [low, high],
        "top_k_best_possible": float(np.mean([r["best_possible"] for r in tumour])),
        "top_1_inside": float(np.mean([r["top_1_inside"] for r in tumour])),
        "all_patches_inside": float(np.mean([r["all_inside"] for r in tumour])), "tumour_slides": len(tumour),
    }  # fmt: skip


def summarise(models: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The headline numbers of each model."""
    summary: dict[str, Any] = {}
    if "clam-demo" in rows:
        classes = models["clam-demo"].spec.classes
        r = rows["clam-demo"]
        truth = np.array([x["label"] != "normal" for x in r])
        score = np.array([x["probabilities"][classes.index("tumour")] for x in r])
        auc = slide_auc(truth, score)
        accuracy = float(np.mean([(x["predicted"] == "tumour") == t for x, t in zip(r, truth, strict=True)]))
        summary["clam-demo"] = {"auc": auc.to_dict(), "text": str(auc), "accuracy": accuracy,
                                "attention": _localisation(r)}  # fmt: skip
    if "clam-subtype-demo" in rows:
        r = rows["clam-subtype-demo"]
        labels = np.array([SUBTYPE_LABELS.index(x["label"]) for x in r])
        predicted = np.array([SUBTYPE_LABELS.index(x["predicted"]) for x in r])
        low, high = bootstrap_ci(balanced_accuracy, labels, predicted, strata=labels)
        confusion = np.zeros((3, 3), int)
        np.add.at(confusion, (labels, predicted), 1)
        summary["clam-subtype-demo"] = {
            "balanced_accuracy": balanced_accuracy(labels, predicted), "balanced_accuracy_ci95": [low, high],
            "confusion (rows truth, columns predicted)": confusion.tolist(), "attention": _localisation(r),
        }  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    """Write the unseen cohort, run both models, print and save the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("build/clam-demo"))
    parser.add_argument("--seed", type=int, default=1, help="cohort seed (the demo models were trained on 0)")
    parser.add_argument("--per-class", type=int, default=7, help="slides per class (3 classes)")
    parser.add_argument("--size", type=int, default=4096, help="slide side in px at 0.5 um/px")
    parser.add_argument("--top-k", type=int, default=4, help="most attended patches checked per slide")
    parser.add_argument("--models", nargs="*", default=["clam-demo", "clam-subtype-demo"],
                        help="registered names or checkpoints")  # fmt: skip
    args = parser.parse_args(argv)
    folder = args.work / f"eval-seed{args.seed}"
    table = write_subtype_cohort(folder, args.per_class, args.seed, size=args.size, subtypes=True)
    entries = read_slide_table(table, classes=SUBTYPE_LABELS)
    models = {Path(m).stem if Path(m).suffix else m: resolve_model(m) for m in args.models}
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    rows = evaluate(models, entries, folder / "cache", args.top_k)
    summary = summarise(models, rows)
    command = "python scripts/evaluate_clam_demo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": command, "seed": args.seed, "slides": len(entries), "size_px": args.size,
              "top_k": args.top_k, "summary": summary, "slides_detail": rows}  # fmt: skip
    out = args.work / "clam-demo-metrics.json"
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({"command": command, "slides": len(entries), **summary}, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
