"""Train the two CLAM demo checkpoints that ship in the package, on synthetic slides only.

    python scripts/train_clam_demo.py [--work DIR] [--seed 0] [--per-class 8] [--size 4096]

1. A subtyping cohort (``write_subtype_cohort``): ``--per-class`` normal,
   tumour type A and tumour type B slides (seed ``--seed``, ``--size`` px at
   0.5 um/px), with two slide tables over the same slides: ``subtypes.csv``
   (normal / tumour_a / tumour_b) and ``binary.csv`` (normal / tumour).
2. ``clam-demo``: CLAM-SB, gated attention, normal vs tumour, trained from
   ``binary.csv`` with the paper's optimiser, sampling, loss and early
   stopping (at most 100 epochs). The trainer extracts every slide's
   features once (the ``tumor-normal-trunk`` encoder: the shipped
   tumour/normal demo model's Inception trunk, trained on synthetic slides,
   256 px at 1 um/px; no ImageNet weights are used or downloaded) into
   ``WORK/train/features``.
3. ``clam-subtype-demo``: CLAM-MB, normal / tumour_a / tumour_b, from
   ``subtypes.csv`` on the same feature files (nothing extracted again).

The networks are narrower than the paper's (L = 128, D = 64 instead of
512 / 256: the encoder gives 256-d features and the checkpoints stay a few
hundred kB). The best checkpoints (lowest validation loss) are copied to
``src/napari_pathology/models/weights/`` labelled *synthetic demo, not for
diagnostic use*, with this script's seed and settings in their provenance.
Measure them on unseen slides with ``scripts/evaluate_clam_demo.py``.
Deterministic for a given seed on one machine; about 7 CPU-minutes (some
10 minutes on 2 idle cores).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from napari_pathology.cli import run_training
from napari_pathology.families.clam.train import ClamTraining, train_clam
from napari_pathology.models.pretrained import shipped_weights
from napari_pathology.models.registry import load_checkpoint, save_checkpoint
from napari_pathology.slide.synthetic import write_subtype_cohort
from napari_pathology.slide.synthetic.truth import SUBTYPE_LABELS

DEMO_LABEL = "synthetic demo, not for diagnostic use"
ENCODER, ENCODER_WEIGHTS = "tumor-normal-trunk", "tumor-normal"
#: The network and the job: the paper's defaults (Adam, weight decay 1e-5, early stopping) but for the width
#: and at most 100 epochs instead of 200 (the validation slides are told apart from the first epochs).
NETWORK = {"hidden": 128, "attention_dim": 64, "gated": True, "dropout": 0.25, "k_sample": 8}
JOB = {"epochs": 100, "min_epochs": 50, "patience": 20, "val_fraction": 0.25, "lr": 2e-4}
MODELS = {
    "clam-demo": ("binary.csv", "sb", ("normal", "tumour"), "normal vs tumour"),
    "clam-subtype-demo": ("subtypes.csv", "mb", SUBTYPE_LABELS, "normal / tumour type A / tumour type B"),
}


def make_cohort(work: Path, per_class: int, seed: int, size: int) -> Path:
    """The training slides and both slide tables; returns the cohort folder."""
    folder = work / "train"
    table = write_subtype_cohort(folder, per_class, seed, size=size, subtypes=True)
    shutil.copyfile(table, folder / "subtypes.csv")
    table = write_subtype_cohort(folder, per_class, seed, size=size, subtypes=False)  # the same slides
    shutil.copyfile(table, folder / "binary.csv")
    return folder


def _ship(checkpoint: Path, name: str, what: str, script: dict[str, Any]) -> Path:
    """Relabel a trained checkpoint as a shipped demo model and copy it into the package."""
    model = load_checkpoint(checkpoint)
    spec = model.spec
    kind = f"CLAM-{spec.config['model_type'].upper()}"
    description = (
        f"Lu et al. 2021 {kind}, gated attention, {what}, on {ENCODER} features ({spec.input_size} px at "
        f"{spec.mpp:g} um/px) ({DEMO_LABEL})"
    )
    model.spec = spec.replace(name=name, description=description)
    provenance = {
        **model.provenance, "label": DEMO_LABEL, "trained_by": "scripts/train_clam_demo.py", "script": script,
    }  # fmt: skip
    target = shipped_weights()[name]
    save_checkpoint(model, target, provenance=provenance, metrics=model.metrics)
    print(f"shipped {target} ({target.stat().st_size / 1e3:.0f} kB): {model.metrics}")
    return target


def main(argv: list[str] | None = None) -> int:
    """Build the cohort, train both demo models and ship them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("build/clam-demo"))
    parser.add_argument("--seed", type=int, default=0, help="cohort, split and initialisation seed")
    parser.add_argument("--per-class", type=int, default=8, help="training slides per class")
    parser.add_argument("--size", type=int, default=4096, help="slide side in px at 0.5 um/px")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="*", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--no-ship", action="store_true", help="train only; leave the package as it is")
    args = parser.parse_args(argv)
    script = {
        "seed": args.seed, "per_class": args.per_class, "size_px": args.size, "mpp": 0.5,
        "encoder": ENCODER, "encoder_weights": ENCODER_WEIGHTS, "network": NETWORK, "job": JOB,
        "command": "python scripts/train_clam_demo.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }  # fmt: skip
    folder = make_cohort(args.work, args.per_class, args.seed, args.size)
    threads = max(1, min(4, torch.get_num_threads()))
    for name in args.models:
        table, model_type, classes, what = MODELS[name]
        out = args.work / f"{name}.pt"
        job = ClamTraining(
            folder / table, out, features_dir=folder / "features", encoder=ENCODER,
            encoder_weights=ENCODER_WEIGHTS, model_type=model_type, classes=tuple(classes), seed=args.seed,
            device=args.device, threads=threads, overwrite=True, **NETWORK, **JOB,
        )  # fmt: skip
        result = run_training(train_clam(job), name)
        print(f"{name}: best {result.best} at {result.metrics}")
        if not args.no_ship:
            _ship(result.best, name, what, script)
    return 0


if __name__ == "__main__":
    sys.exit(main())
