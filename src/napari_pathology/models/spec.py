"""What a model is and how to run it: :class:`ModelSpec` and its validation.

A :class:`ModelSpec` says everything the engine needs to run a model
correctly: family, classes, input size and um/px, label (centre) region,
stride, input normalisation, output kind and slide-level aggregator. Specs
are plain data (JSON-like ``config``), so a checkpoint can carry one and be
read with ``torch.load(weights_only=True)``.

No Qt, no napari, no torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_pathology.tiles import NORMALIZATIONS

__all__ = ["AGGREGATORS", "OUTPUTS", "ModelError", "ModelSpec"]

OUTPUTS = ("heatmap", "points", "slide", "nuclei")
AGGREGATORS = ("max", "mean", "fraction", "attention")


class ModelError(ValueError):
    """A model cannot be found, built or loaded; the message says which and why."""


def _plain(value: Any, where: str) -> Any:
    """A JSON-like copy (dict/list/str/int/float/bool/None); tuples become lists."""
    if value is None:
        return None
    for kind in (bool, int, float, str):  # exact builtins: subclasses (np.float64...) do not unpickle safely
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return value.item()
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be strings, got {key!r}")
            out[key] = _plain(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_plain(item, f"{where}[]") for item in value]
    if hasattr(value, "tolist"):  # numpy arrays, tensors
        return _plain(value.tolist(), where)
    raise ValueError(
        f"{where}: {type(value).__name__} values cannot be stored (use str, numbers, lists, dicts)"
    )


@dataclass(frozen=True)
class ModelSpec:
    """What a model is and how to run it.

    Parameters
    ----------
    name : str
        Registry name (or the name a trained checkpoint carries).
    family : str
        Builder family (``metastasis``, ``tumor-normal``, ``baseline``...).
    task : str
        Human-readable task, shown in the Analyze panel.
    classes : tuple of str
        Output classes, in logit order (at least two, unique).
    input_size : int
        Model input side, px at ``mpp``.
    mpp : float
        um/px of the model's input.
    centre_size : int, optional
        Side of the label region in px at ``mpp`` (Liu et al.: 128 of 299);
        None when the label is for the whole tile.
    stride : int, optional
        Default inference stride in px at ``mpp`` (None: ``centre_size`` or
        ``input_size``; see :attr:`default_stride`).
    normalization : str
        One of :data:`napari_pathology.tiles.NORMALIZATIONS`.
    output : str
        ``"heatmap"``, ``"points"``, ``"slide"`` or ``"nuclei"`` (one probability per given nucleus).
    aggregator : str
        Slide score from tiles: ``"max"``, ``"mean"``, ``"fraction"`` or ``"attention"``.
    positive_class : str, optional
        Class whose probability makes the heatmap (default: the last class).
    tta : bool
        Whether 8-orientation test-time augmentation is allowed/meaningful.
    description : str
        One line for listings.
    config : dict
        Keyword arguments of the family's builder (JSON-like values).

    Raises
    ------
    ValueError
        For any invalid field, naming it.

    """

    name: str
    family: str
    task: str
    classes: tuple[str, ...]
    input_size: int
    mpp: float
    centre_size: int | None = None
    stride: int | None = None
    normalization: str = "imagenet"
    output: str = "heatmap"
    aggregator: str = "max"
    positive_class: str | None = None
    tta: bool = False
    description: str = ""
    config: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("name", "family", "task", "description"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"model spec field {name!r} must be a string, got {getattr(self, name)!r}")
        for name in ("name", "family"):
            value = getattr(self, name).strip()
            if not value:
                raise ValueError(f"model spec field {name!r} must not be empty")
            fix(name, value)
        if "/" in self.name or "\\" in self.name:
            raise ValueError(f"model name {self.name!r} must not contain path separators")
        if self.name in (".", "..") or any(ord(c) < 32 for c in self.name):
            raise ValueError(
                f"model name {self.name!r} is not a usable name (a dot name or control characters)"
            )
        classes = self.classes
        if isinstance(classes, str) or not isinstance(classes, list | tuple):
            raise ValueError(f"model spec 'classes' must be a list of names, got {classes!r}")
        classes = tuple(classes)
        if len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
            raise ValueError(f"model spec 'classes' needs at least two non-empty names, got {list(classes)}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"model spec 'classes' must be unique, got {list(classes)}")
        fix("classes", classes)
        fix("input_size", _spec_int(self.input_size, "input_size"))
        if self.centre_size is not None:
            fix("centre_size", _spec_int(self.centre_size, "centre_size"))
            if self.centre_size > self.input_size:
                raise ValueError(
                    f"model spec centre_size ({self.centre_size}) exceeds input_size ({self.input_size})"
                )
        if self.stride is not None:
            fix("stride", _spec_int(self.stride, "stride"))
        try:
            mpp = float(self.mpp)
        except (TypeError, ValueError):
            mpp = float("nan")
        if isinstance(self.mpp, bool) or not math.isfinite(mpp) or mpp <= 0:
            raise ValueError(f"model spec 'mpp' must be a positive number (um/px), got {self.mpp!r}")
        fix("mpp", mpp)
        for name, allowed in (
            ("normalization", NORMALIZATIONS),
            ("output", OUTPUTS),
            ("aggregator", AGGREGATORS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"model spec {name!r} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.positive_class is not None and self.positive_class not in classes:
            raise ValueError(
                f"model spec positive_class {self.positive_class!r} is not one of the classes {list(classes)}"
            )
        if not isinstance(self.tta, bool):
            raise ValueError(f"model spec 'tta' must be true or false, got {self.tta!r}")
        if not isinstance(self.config, Mapping):
            raise ValueError(f"model spec 'config' must be a dict, got {type(self.config).__name__}")
        fix("config", _plain(self.config, "model spec config"))

    # ------------------------------------------------------------------ derived
    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def positive_index(self) -> int:
        """Index of the class whose probability makes the heatmap."""
        return self.classes.index(self.positive_class) if self.positive_class else len(self.classes) - 1

    @property
    def default_stride(self) -> int:
        """``stride``, else ``centre_size``, else ``input_size`` (px at ``mpp``)."""
        return self.stride or self.centre_size or self.input_size

    # ------------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (``classes`` as a list)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["classes"] = list(self.classes)
        data["config"] = _plain(self.config, "config")
        return data

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """Build and validate a spec from :meth:`to_dict` output.

        Raises
        ------
        ValueError
            For missing, unknown or invalid fields.

        """
        if not isinstance(d, Mapping):
            raise ValueError(f"a model spec must be a dict, got {type(d).__name__}")
        fields = dataclasses.fields(cls)
        names = [f.name for f in fields]
        optional = {f.name for f in fields if f.default is not dataclasses.MISSING}
        optional |= {f.name for f in fields if f.default_factory is not dataclasses.MISSING}
        required = [n for n in names if n not in optional]
        missing = [n for n in required if n not in d]
        if missing:
            raise ValueError(f"model spec lacks {', '.join(missing)}")
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"model spec has unknown field(s) {', '.join(map(str, unknown))}")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> ModelSpec:
        """A copy with some fields changed (validated)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"model spec has no field(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


def _spec_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 1:
        raise ValueError(f"model spec {name!r} must be a positive integer, got {value!r}")
    return int(value)
