"""Train the shipped ``nucleus-purity`` demo checkpoint on synthetic nuclei; test it on unseen slides.

    python scripts/train_nucleus_demo.py [--work DIR] [--epochs N] [--no-ship]

1. Training data: 3 synthetic slides (seeds 601-603, 4096 px at 0.5 um/px),
   every rendered nucleus labelled from the slide's ``*.nuclei.csv`` (kind
   ``tumour`` is tumour, every other kind normal).
2. Training: ``nucleus-purity-cnn`` from scratch (16 um patches at 32 px,
   per-channel histogram equalisation), 20% of the nuclei held out by
   150 um blocks for validation; best checkpoint by validation cross-entropy.
3. Test: 3 slides no model saw (seeds 701 and 702 with tumour, 703 without),
   all their nuclei classified: nucleus AUC per slide and pooled, and the RMSE
   of predicted (mean probability) against true purity over 200 um boxes
   holding at least 20 nuclei.
4. The checkpoint (weights stored as float16, ~0.2 MB) is written to
   ``src/napari_pathology/models/weights/nucleus-purity-demo.pt`` as the
   registered name ``nucleus-purity``, labelled *synthetic demo, not for
   diagnostic use*, with the test numbers in its metrics.

Deterministic for given seeds on one machine; a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from napari_pathology.analysis.metrics import roc_auc
from napari_pathology.families.nucleus_purity.train import (
    NucleusPurityTraining,
    evaluate_nucleus_purity,
    synthetic_labelled_nuclei,
    train_nucleus_purity,
)
from napari_pathology.models.pretrained import shipped_weights
from napari_pathology.models.registry import load_checkpoint, save_checkpoint
from napari_pathology.progress import run_to_completion
from napari_pathology.slide.synthetic import write_synthetic_slide

DEMO_LABEL = "synthetic demo, not for diagnostic use"
TRAIN_SEEDS = (601, 602, 603)
TEST_SEEDS = {701: False, 702: False, 703: True}  # seed -> negative (no tumour)


def _slides(folder: Path, seeds: dict[int, bool], size: int) -> list[Path]:
    paths = []
    for seed, negative in seeds.items():
        path = folder / f"slide-{seed}.tif"
        if not path.with_name(f"{path.stem}.nuclei.csv").is_file():
            write_synthetic_slide(path, size=size, seed=seed, negative=negative)
        paths.append(path)
    return paths


def _train(work: Path, epochs: int, device: str) -> Path:
    slides = _slides(work / "train", dict.fromkeys(TRAIN_SEEDS, False), 4096)
    data = [synthetic_labelled_nuclei(p) for p in slides]
    settings = NucleusPurityTraining(epochs=epochs, device=device, seed=0, log_every=50)
    out = work / "nucleus-purity-demo.pt"
    job = train_nucleus_purity(data, out, settings)
    while True:
        try:
            event = next(job)
        except StopIteration as stop:
            result = stop.value
            break
        if event.kind in ("validation", "log", "done") and not event.message.startswith("nucleus patches"):
            print(event.message, flush=True)
    print(f"best checkpoint {result.best}: {result.metrics}")
    return out


def _evaluate(model: torch.nn.Module, work: Path, device: str) -> dict[str, float]:
    slides = _slides(work / "test", TEST_SEEDS, 4096)
    labels, probs, squared, regions = [], [], 0.0, 0
    print(f"{'slide':<16}{'nuclei':>8}{'tumour':>8}{'AUC':>8}{'purity':>8}{'pred':>8}{'RMSE':>8}{'boxes':>7}")
    for path in slides:
        data = synthetic_labelled_nuclei(path)
        job = evaluate_nucleus_purity(data, model, block_um=200.0, min_region_nuclei=20, device=device)
        m = run_to_completion(job)
        labels.append(data.is_tumour)
        probs.append(m["probabilities"])
        squared += m["purity_rmse"] ** 2 * m["regions"]
        regions += m["regions"]
        print(
            f"{path.name:<16}{m['nuclei']:>8}{int(data.is_tumour.sum()):>8}{m['auc']:>8.4f}"
            f"{m['true_purity']:>8.3f}{m['predicted_purity']:>8.3f}{m['purity_rmse']:>8.4f}{m['regions']:>7}"
        )
    pooled_auc = roc_auc(np.concatenate(labels), np.concatenate(probs))
    rmse = math.sqrt(squared / max(regions, 1))
    print(f"pooled over {len(slides)} unseen slides: nucleus AUC {pooled_auc:.4f}, "
          f"purity RMSE {rmse:.4f} over {regions} boxes of 200 um")  # fmt: skip
    return {"unseen_auc": pooled_auc, "unseen_purity_rmse": rmse, "unseen_boxes": regions}


def _ship(checkpoint: Path, unseen: dict[str, float]) -> Path:
    model = load_checkpoint(checkpoint)
    model.spec = model.spec.replace(
        name="nucleus-purity",
        description=(
            "Noorbakhsh et al. 2020 nucleus classifier (after Hlavcheva et al.), 16 um nucleus patches at "
            f"32 px, trained on synthetic labelled nuclei ({DEMO_LABEL})"
        ),
    )
    model.half()  # float16 weights (loaded back into float32): half the size, same probabilities to 1e-3
    provenance = {**model.provenance, "label": DEMO_LABEL, "trained_by": "scripts/train_nucleus_demo.py"}
    target = shipped_weights()["nucleus-purity"]
    save_checkpoint(model, target, provenance=provenance, metrics={**model.metrics, **unseen})
    print(f"shipped {target} ({target.stat().st_size / 1e3:.0f} kB)")
    return target


def main(argv: list[str] | None = None) -> int:
    """Make the data, train, test on unseen slides and ship the checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("build/nucleus-demo"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-ship", action="store_true", help="train and test only")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    checkpoint = _train(args.work, args.epochs, args.device)
    unseen = _evaluate(load_checkpoint(checkpoint), args.work, args.device)
    if not args.no_ship:
        target = _ship(checkpoint, unseen)
        print("shipped checkpoint on the unseen slides:")
        _evaluate(load_checkpoint(target), args.work, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
