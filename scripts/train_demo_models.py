"""Train the demo checkpoints that ship in the package, on synthetic slides only.

    python scripts/train_demo_models.py [--work DIR] [--stage all|data|metastasis|tumor-normal]

1. ``data``: a training cohort of 20 synthetic slides (seed 1: 8 negative,
   4 micro- and 8 macro-metastasis slides, 8192 px at 0.5 um/px).
2. ``metastasis``: the small Inception v3 (1/8 width) at 1 um/px ("10x"),
   trained from random initialisation with Liu et al.'s sampling,
   augmentation and RMSProp, 4 slides held out for validation, plus
   hard-negative mining (30% of normal patches, after each validation, from
   normal tissue the model calls tumour: lymphoid aggregates, blur).
3. ``tumor-normal``: Noorbakhsh et al.'s head (FC 1024, dropout 0.2) on the
   frozen trunk of that metastasis model (no ImageNet weights are shipped),
   256 px tiles at 1 um/px (the paper's 512 px at 20x field of view), from
   slide labels only, on a second cohort of 24 slides (seed 3) whose pen
   marks and blur are shared equally by both classes, with 3 normal tiles
   drawn per tumour-slide tile (``normal_weight``: most tiles of a tumour
   slide are normal, so its label is noisy, a normal slide's never is). The
   weight 3 is the smallest that left no tile called tumour on the negatives
   of two validation cohorts (seed 4, ``evaluate_demo_models.py --seed 4``,
   and the seed-1 cohort), tried 1-8; 1 (the paper's balance) gave
   negatives a TPF of up to 0.2.

The checkpoints are copied to ``src/napari_pathology/models/weights/`` with
the label *synthetic demo, not for diagnostic use*. Evaluate them on
unseen slides with ``scripts/evaluate_demo_models.py``. Deterministic for a
given seed on one machine; about 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from napari_pathology.cli import run_training, run_with_progress
from napari_pathology.cohort import write_synthetic_cohort
from napari_pathology.families.metastasis.train import MetastasisTraining, train_metastasis
from napari_pathology.models.pretrained import shipped_weights
from napari_pathology.models.registry import load_checkpoint, save_checkpoint

DEMO_LABEL = "synthetic demo, not for diagnostic use"


def _ship(checkpoint: Path, name: str, description: str) -> Path:
    """Relabel a trained checkpoint as a shipped demo model and copy it into the package."""
    model = load_checkpoint(checkpoint)
    model.spec = model.spec.replace(name=name, description=f"{description} ({DEMO_LABEL})")
    provenance = {**model.provenance, "label": DEMO_LABEL, "trained_by": "scripts/train_demo_models.py"}
    target = shipped_weights()[name]
    save_checkpoint(model, target, provenance=provenance, metrics=model.metrics)
    print(f"shipped {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def main(argv: list[str] | None = None) -> int:
    """Build the training cohort, train both demo models and ship them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("build/demo-training"))
    parser.add_argument("--stage", choices=("all", "data", "metastasis", "tumor-normal"), default="all")
    parser.add_argument("--steps", type=int, default=1000, help="metastasis optimiser steps")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    table = args.work / "train" / "cohort.csv"
    if args.stage in ("all", "data") or not table.is_file():
        run_with_progress(write_synthetic_cohort(args.work / "train", 20, 1, micro_fraction=0.3), "slides")
    metastasis = args.work / "metastasis-demo.pt"
    if args.stage in ("all", "metastasis"):
        job = MetastasisTraining(
            data=table, out=metastasis, start="metastasis-small-10x", steps=args.steps, batch_size=32,
            val_fraction=0.2, val_patches=256, eval_every=100, device=args.device, seed=0,
            hard_negative_fraction=0.3,
        )  # fmt: skip
        run_training(train_metastasis(job), "metastasis")
        _ship(metastasis, "metastasis", "Liu et al. 2017 metastasis detector, small Inception v3, 1 um/px")
    if args.stage in ("all", "tumor-normal"):
        from napari_pathology.families.tumor_normal.train import TumorNormalTraining, train_tumor_normal

        # Slide labels make every artefact that is commoner in one class a shortcut for the label
        # (blur on 2 of 12 tumour slides but 1 of 8 negatives taught "blur = tumour"), so the
        # tile classifier trains on its own cohort with artefacts in equal shares of both classes.
        tpf_cohort = write_synthetic_cohort(args.work / "train-tpf", 24, 3, micro_fraction=0.3,
                                            balanced_artefacts=True)  # fmt: skip
        tpf_table = run_with_progress(tpf_cohort, "slides (tumour/normal)")
        out = args.work / "tumor-normal-demo.pt"
        job = TumorNormalTraining(
            data=tpf_table, out=out, start="tumor-normal-small-10x", trunk_from=str(metastasis), epochs=30,
            batch_size=512, val_fraction=0.2, normal_weight=3.0, device=args.device, seed=0,
            cache_dir=args.work / "features",
        )  # fmt: skip
        run_training(train_tumor_normal(job), "tumor-normal")
        _ship(out, "tumor-normal", "Noorbakhsh et al. 2020 tumour/normal tiles (TPF), 256 px at 1 um/px")
    shutil.rmtree(args.work / "tmp", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
