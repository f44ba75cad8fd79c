"""Train the shipped whole-slide CNN demo (``wholeslide-demo``) on synthetic slides.

    python scripts/train_wholeslide_demo.py [--work DIR] [--seed 0] [--per-class 32] [--size 4096]

1. A subtyping cohort (``write_subtype_cohort``): ``--per-class`` normal,
   tumour type A and tumour type B slides (seed ``--seed``, ``--size`` px at
   0.5 um/px, 1-3 macro lesions of 0.5-3 mm scaled to the slide,
   ``--micro-fraction`` of the tumour slides with one micro lesion
   instead), labelled normal / tumour_a / tumour_b, in ``WORK/train``.
2. ``wholeslide-demo``: Chen et al. 2021's whole-slide CNN (frozen
   BatchNorm, global max pooling, a linear head over the three classes)
   trained from slide labels only by the family's trainer
   (``train_wholeslide``: each slide's tissue box read at the input um/px,
   kept in a disk cache, the exact tiled pass). Three classes rather than
   tumour vs normal: with one "tumour" logit, global max pooling learned
   type A's dark nests and never type B's pale sheets (AUC 0.69 on unseen
   slides); with a logit per type it learns both, and P(tumour) is
   1 - P(normal). Smaller than Chen's so that it trains on 2 CPU cores: a
   ResNet-18 of base width ``WIDTH`` (instead of a ResNet-50 of width 64) on
   the slides at ``INPUT_MPP`` um/px (instead of about 2.5; a 4096 px slide
   is a 512 px input), from a fixed-seed random initialisation started from
   data (frozen batch-norm statistics measured on training slides, residual
   blocks as identities; no ImageNet weights are used or downloaded), hence
   a learning rate of ``JOB["lr"]`` instead of the paper's 2e-5, which is a
   fine-tuning rate from ImageNet.

The best checkpoint (lowest validation loss) is copied to
``src/napari_pathology/models/weights/wholeslide-demo.pt`` labelled
*synthetic demo, not for diagnostic use*, with this script's seed and
settings in its provenance. Measure it on unseen slides with
``scripts/evaluate_wholeslide_demo.py``. About 15 minutes on 2 CPU cores
(about 5 for the cohort, 9 for training).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from napari_pathology.cli import run_training
from napari_pathology.families.wholeslide.train import WholeSlideTraining, train_wholeslide
from napari_pathology.models.pretrained import shipped_weights
from napari_pathology.models.registry import load_checkpoint, save_checkpoint
from napari_pathology.slide.synthetic import write_subtype_cohort

DEMO_LABEL = "synthetic demo, not for diagnostic use"
NAME = "wholeslide-demo"
ARCH, WIDTH, INPUT_MPP = "resnet18", 16, 4.0
#: The job: Chen's optimiser (Adam, plateau decay on the validation loss) and augmentations, but from random
#: initialisation (lr 1e-3 rather than the fine-tuning rate 2e-5) and one slide per forward.
JOB = {
    "epochs": 50, "lr": 1e-3, "min_lr": 1e-5, "patience": 15, "accumulation": 4, "val_fraction": 0.2,
    "flips": True, "rotations": True, "colour": 0.1,
}  # fmt: skip


def _ship(checkpoint: Path, script: dict[str, Any]) -> Path:
    """Relabel the trained checkpoint as the shipped demo model and copy it into the package."""
    model = load_checkpoint(checkpoint)
    spec = model.spec
    description = (
        f"Chen et al. 2021 whole-slide CNN: {ARCH} (base width {WIDTH}) with frozen BatchNorm and global max "
        f"pooling, normal / tumour type A / tumour type B, the slide's tissue at {spec.mpp:g} um/px "
        f"({DEMO_LABEL})"
    )
    model.spec = spec.replace(name=NAME, description=description)
    provenance = {**model.provenance, "label": DEMO_LABEL, "trained_by": "scripts/train_wholeslide_demo.py",
                  "script": script}  # fmt: skip
    target = shipped_weights()[NAME]
    save_checkpoint(model, target, provenance=provenance, metrics=model.metrics)
    print(f"shipped {target} ({target.stat().st_size / 1e6:.2f} MB): {model.metrics}")
    return target


def main(argv: list[str] | None = None) -> int:
    """Build the cohort, train the demo model and ship it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("build/wholeslide-demo"))
    parser.add_argument("--seed", type=int, default=0, help="cohort, split and sampling seed")
    parser.add_argument("--per-class", type=int, default=32, help="normal, type A and type B slides each")
    parser.add_argument("--micro-fraction", type=float, default=0.0, help="tumour slides with a micro lesion")
    parser.add_argument("--size", type=int, default=4096, help="slide side in px at 0.5 um/px")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads torch uses")
    parser.add_argument("--no-ship", action="store_true", help="train only; leave the package as it is")
    args = parser.parse_args(argv)
    script = {
        "seed": args.seed, "per_class": args.per_class, "micro_fraction": args.micro_fraction,
        "size_px": args.size, "mpp": 0.5, "arch": ARCH, "width": WIDTH, "input_mpp": INPUT_MPP, "job": JOB,
        "threads": args.threads,
        "command": "python scripts/train_wholeslide_demo.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }  # fmt: skip
    started = time.perf_counter()
    table = write_subtype_cohort(
        args.work / "train", args.per_class, args.seed, size=args.size, micro_fraction=args.micro_fraction,
        subtypes=True,
    )  # fmt: skip
    print(f"cohort: {3 * args.per_class} slides in {time.perf_counter() - started:.0f} s", flush=True)
    job = WholeSlideTraining(
        table, args.work / f"{NAME}.pt", arch=ARCH, width=WIDTH, imagenet=False, input_mpp=INPUT_MPP,
        cache_dir=args.work / "cache", seed=args.seed, device=args.device, threads=args.threads, amp=False,
        overwrite=True, **JOB,
    )  # fmt: skip
    result = run_training(train_wholeslide(job), NAME)
    minutes = (time.perf_counter() - started) / 60
    print(f"{NAME}: best {result.best} at {result.metrics}; {minutes:.1f} min in all", flush=True)
    script["minutes"] = round(minutes, 1)
    if not args.no_ship:
        _ship(result.best, script)
    return 0


if __name__ == "__main__":
    sys.exit(main())
