"""The ``train`` sub-command: its options are generated from the families' settings dataclasses.

Building them imports every family (and torch), so :func:`add_parser` builds
them only for ``train`` itself; every other command gets a stub.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from napari_pathology.cli.errors import CommandError, interrupted_status, sigterm_as_interrupt
from napari_pathology.cli.options import (
    EPOCHS,
    LEARNING_RATE,
    NORMAL_WEIGHT,
    TRAIN_BATCH_SIZE,
    TRAIN_STEPS,
    VAL_FRACTION,
    device_option,
    finite_float,
    int_option,
    positive_int,
    seed_int,
)
from napari_pathology.cli.progress_bars import run_training


def _cmd_train(args: argparse.Namespace) -> int:
    import time

    from napari_pathology.cohort import CohortError
    from napari_pathology.training import TrainingError
    from napari_pathology.training.loop import checkpoint_paths

    started = time.time()
    try:
        with sigterm_as_interrupt() as received:
            result = _train_job(args)
    except (TrainingError, CohortError) as error:
        raise CommandError(str(error)) from error
    except KeyboardInterrupt:
        last = checkpoint_paths(args.out)[1]
        if last.is_file() and last.stat().st_mtime >= started:
            print(f"stopped: the last checkpoint {last} is saved (continue with --resume)", file=sys.stderr)
        elif last.is_file():
            print(f"stopped before a new checkpoint was saved; {last} is unchanged", file=sys.stderr)
        else:
            print("stopped before the first checkpoint was saved: nothing was kept", file=sys.stderr)
        return interrupted_status(received)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if isinstance(v, float))
    if result.best is not None:
        print(f"best checkpoint: {result.best} ({shown})" if shown else f"best checkpoint: {result.best}")
    else:
        print("best checkpoint: none yet (no validation ran before the job stopped)")
    print(f"last checkpoint: {result.last} (step {result.step})")
    return 0


def _train_job(args: argparse.Namespace) -> Any:
    """Build the family's settings from the options given (the rest: its defaults) and drive its trainer."""
    from napari_pathology.families import get_family
    from napari_pathology.training.loop import check_output

    family = get_family(args.family)
    offered = {f.name: f for f in family.setting_fields()}
    values: dict[str, Any] = {}
    for flag, dest in _TRAIN_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:  # not given: the family's default (0 is a value to check)
            continue
        field = next((f for f in offered.values() if f.flag == flag), None)
        if field is None:
            raise CommandError(f"{flag} is not a setting of {family.name} (see train {family.name} --help)")
        values[field.name] = value
    if "classes" in offered and "classes" not in values and "slide_table" in family.data_sources:
        values.update(_table_classes(family, args.data))
    settings = family.make_settings(args.data, args.out, **values)
    check_output(args.out, resume=bool(values.get("resume")), overwrite=bool(values.get("overwrite")))
    data = family.read_data(args.data)
    return run_training(family.train(settings, data, args.out), f"train {family.name}", args.quiet)


def _table_classes(family: Any, data: Path) -> dict[str, Any]:
    """``{"classes": ...}`` for a slide table whose labels are not only tumour/normal (as the Train panel)."""
    from napari_pathology.cohort import read_slide_table, table_labels

    labels = table_labels(data)
    if not labels:
        return {}
    implied = family.check_table(read_slide_table(data, classes=labels))
    return {"classes": tuple(implied.get("classes") or labels)}


#: Option ranges of training settings, by flag (every other setting is checked by its dataclass).
_SETTING_TYPES: dict[str, Callable[[str], Any]] = {
    "--steps": TRAIN_STEPS, "--epochs": EPOCHS, "--batch-size": TRAIN_BATCH_SIZE, "--lr": LEARNING_RATE,
    "--val-fraction": VAL_FRACTION, "--normal-weight": NORMAL_WEIGHT, "--seed": seed_int,
    "--eval-every": positive_int, "--threads": positive_int, "--device": device_option,
}  # fmt: skip
#: Flag -> argparse destination of the generated training options (filled by _add_training_flags).
_TRAIN_FLAGS: dict[str, str] = {}


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in str(text).split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"must be comma-separated names, got {text!r}")
    return names


def _setting_type(flag: str, kind: str) -> Callable[[str], Any] | None:
    if flag in _SETTING_TYPES:
        return _SETTING_TYPES[flag]
    return {
        "int": int_option(-(2**63)), "float": finite_float(), "str": str, "path": Path, "names": _names,
    }.get(kind)  # fmt: skip


def _add_training_flags(train: argparse.ArgumentParser) -> None:
    """One option per training setting of every registered family, generated from the settings dataclasses.

    Types come from the field annotations, help and defaults from the
    dataclass's docstring and defaults; an option left out means the chosen
    family's default.
    """
    from napari_pathology.families import list_families

    by_flag: dict[str, list[tuple[str, Any]]] = {}
    for family in list_families(trainable=True):
        for field in family.setting_fields():
            by_flag.setdefault(field.flag, []).append((family.name, field))
    _TRAIN_FLAGS.clear()
    for flag, owners in by_flag.items():
        kind = owners[0][1].kind
        helps = {f.help for _, f in owners}

        def default(f: Any) -> str:
            value = f.default
            return ",".join(value) if isinstance(value, tuple) else str(value)

        if len(helps) == 1:
            defaults = ", ".join(f"{name} {default(f)}" for name, f in owners)
            text = f"{owners[0][1].help} (default: {defaults})"
        else:
            text = "; ".join(f"{name}: {f.help} (default {default(f)})" for name, f in owners)
        text = text.replace("``", "").replace("%", "%%")
        dest = flag.removeprefix("--").replace("-", "_")
        _TRAIN_FLAGS[flag] = dest
        if kind == "bool":
            action = argparse.BooleanOptionalAction
            train.add_argument(flag, dest=dest, action=action, default=None, help=text)
        else:
            train.add_argument(flag, dest=dest, type=_setting_type(flag, kind), default=None, help=text)


def add_parser(sub: Any, families: bool = True) -> None:
    """Add ``train``: with ``families=False`` a stub without the families' options (no torch import)."""
    if not families:
        sub.add_parser("train", help="train or fine-tune a model; best and last checkpoints", add_help=False)
        return
    from napari_pathology.families import DATA_SOURCES, list_families

    trainable = list_families(trainable=True)
    train = sub.add_parser(
        "train", help="train or fine-tune a model; best and last checkpoints",
        description="Train a model family. Every option below is a field of a family's training "
        "settings; an option left out takes that family's default.",
    )  # fmt: skip
    train.add_argument(
        "family", choices=[f.name for f in trainable],
        help="; ".join(f"{f.name}: {f.title or f.name} (data: {', '.join(f.data_sources) or '-'})"
                       for f in trainable),
    )  # fmt: skip
    train.add_argument("--data", type=Path, required=True,
                       help=f"the training data ({', '.join(DATA_SOURCES)}): slide_table is a CSV (slide, "
                            "label, annotations) or a folder of slides; nuclei is a slide (labels from its "
                            "Nuclei-panel autosave) or a CSV with columns slide[,nuclei][,mpp]")  # fmt: skip
    train.add_argument("--out", type=Path, required=True, help="best checkpoint (.pt)")
    _add_training_flags(train)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)
