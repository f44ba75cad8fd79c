"""The :class:`Family` interface: everything the rest of the program needs to know about a model family.

A family is one folder under ``families/`` (or a third party's package): its
networks and registered specs, its training settings (a dataclass whose
fields and numpydoc ``Parameters`` are the single source of every default:
the CLI's ``train`` flags and the Train panel's fields are generated from
them), the data it trains from, its trainer (one signature for every family),
its loss, the metric that picks the best checkpoint, how it runs on a slide
(by input kind) and its shipped demo weights. Nothing outside the family's
folder names it: the CLI, the panels, the engine and the evaluation ask the
family registry (:mod:`napari_pathology.families`). No Qt, no napari.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import typing
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "DATA_SOURCES",
    "INPUT_KINDS",
    "Family",
    "SettingField",
    "setting_fields",
]

#: What a family's network looks at: a tile of a slide, a patch around a nucleus, a bag of tile
#: features (attention-MIL) or a whole slide at low magnification.
INPUT_KINDS = ("tile", "nucleus", "bag", "slide")
#: Where training data can come from: regions drawn in the viewer, a slide table (CSV or a folder
#: of slides), labelled nuclei (a Nuclei-panel autosave or a CSV of them).
DATA_SOURCES = ("regions", "slide_table", "nuclei")
#: Settings fields that are not settings: where the data is and where the model goes.
NOT_SETTINGS = frozenset({"data", "out"})


@dataclasses.dataclass(frozen=True)
class SettingField:
    """One training setting as the CLI and the Train panel see it.

    ``name`` is the dataclass field, ``flag`` the command-line option
    (``--batch-size``; a field's ``metadata["flag"]`` overrides it), ``kind``
    one of ``int``, ``float``, ``str``, ``bool``, ``path``, ``names`` (a
    comma-separated tuple of names); ``optional`` when None is allowed;
    ``help`` comes from the dataclass's numpydoc ``Parameters``.
    """

    name: str
    flag: str
    kind: str
    default: Any
    optional: bool
    help: str


def _docstring_params(cls: type) -> dict[str, str]:
    """``name -> description`` from a numpydoc ``Parameters`` section (one paragraph, joined)."""
    doc = cls.__doc__ or ""
    match = re.search(r"Parameters\n\s*-+\n(.*?)(?:\n\s*\n\s*[A-Z][a-z]+\n\s*-+\n|\Z)", doc, re.S)
    if not match:
        return {}
    out: dict[str, str] = {}
    current: str | None = None
    indent: int | None = None
    for line in match.group(1).splitlines():
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        head = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?::|$)", line)
        if head and (indent is None or width <= indent):
            indent, current = width, head.group(1)
            out[current] = ""
        elif current is not None:
            out[current] = f"{out[current]} {line.strip()}".strip()
    return out


def _kind(annotation: Any) -> tuple[str | None, bool]:
    """The setting kind of a type annotation and whether it allows None; (None, _) when unsupported."""
    optional = False
    args = typing.get_args(annotation)
    if args and type(None) in args:
        optional = True
        rest = [a for a in args if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else None
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return "bool", optional
    if annotation is int:
        return "int", optional
    if annotation is float:
        return "float", optional
    if annotation is str:
        return "str", optional
    if annotation in (Path, os.PathLike):
        return "path", optional
    if origin is tuple and typing.get_args(annotation)[:1] == (str,):
        return "names", optional
    return None, optional


def setting_fields(settings_cls: type) -> list[SettingField]:
    """The settings of a training dataclass the CLI and the Train panel offer, in field order.

    Fields named ``data`` and ``out``, fields whose ``metadata`` says
    ``{"cli": False}``, and fields of types a form cannot hold (nested
    dataclasses) are left out.
    """
    hints = typing.get_type_hints(settings_cls)
    docs = _docstring_params(settings_cls)
    out = []
    for f in dataclasses.fields(settings_cls):
        if f.name in NOT_SETTINGS or not f.metadata.get("cli", True):
            continue
        kind, optional = _kind(hints.get(f.name))
        if kind is None:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        out.append(SettingField(f.name, flag, kind, default, optional, docs.get(f.name, "")))
    return out


class Family:
    """A model family: subclass it in ``families/<name>/`` and register one instance.

    Class attributes say what the family is; methods with a default here are
    the hooks a family overrides. See ``docs/adding-a-family.md``.

    Attributes
    ----------
    name : str
        The family name checkpoints carry in their spec (``spec.family``).
    input_kind : str
        One of :data:`INPUT_KINDS`; picks the inference runner.
    title : str
        One line for lists and panels.
    settings : type or None
        The training settings dataclass (None: the family is not trainable).
    data_sources : tuple of str
        Which of :data:`DATA_SOURCES` its trainer accepts.
    best_metric : str or None
        The validation metric that picks the best checkpoint; ``best_mode``
        says whether higher (``"max"``) or lower (``"min"``) is better.
    fixed : bool
        Its registered models are usable as they are (no training needed).
    demo_weights : dict
        Registered name -> checkpoint file shipped with the package.
    """

    name: ClassVar[str] = ""
    input_kind: ClassVar[str] = "tile"
    title: ClassVar[str] = ""
    settings: ClassVar[type | None] = None
    data_sources: ClassVar[tuple[str, ...]] = ()
    best_metric: ClassVar[str | None] = None
    best_mode: ClassVar[str] = "max"
    fixed: ClassVar[bool] = False
    demo_weights: ClassVar[dict[str, str | os.PathLike[str]]] = {}

    # ------------------------------------------------------------------ registration
    def register_models(self) -> None:
        """Register the family's builders and specs (import its model module). Called once."""

    # ------------------------------------------------------------------ training
    @property
    def trainable(self) -> bool:
        """Whether the family has a trainer (a settings dataclass)."""
        return self.settings is not None

    def setting_fields(self) -> list[SettingField]:
        """The settings the CLI and the Train panel offer (see :func:`setting_fields`)."""
        return [] if self.settings is None else setting_fields(self.settings)

    def defaults(self) -> dict[str, Any]:
        """Every setting's default, by field name."""
        return {f.name: f.default for f in self.setting_fields()}

    def make_settings(self, data: Any, out: str | os.PathLike[str], **values: Any) -> Any:
        """The settings dataclass from chosen values (the rest default); refuses bad values by name."""
        if self.settings is None:
            raise NotImplementedError(f"family {self.name!r} cannot be trained")
        names = {f.name for f in dataclasses.fields(self.settings)}
        given = {k: v for k, v in values.items() if k in names}
        for where, value in (("data", data), ("out", out)):
            if where in names:
                given[where] = value
        return self.settings(**given)

    def read_data(self, path: str | os.PathLike[str]) -> Any:
        """The training data at ``path`` (what ``train --data`` names); the path itself by default."""
        return Path(path)

    def nuclei_data(
        self,
        points: Any,
        slide_path: str | os.PathLike[str],
        mpp: float | None = None,
        regions: list[Any] | None = None,
    ) -> Any:
        """Training data from nuclei labelled in the viewer (families with the ``nuclei`` data source).

        ``points`` is the Nuclei panel's :class:`~napari_pathology.nuclei.points.NucleusPoints`
        on the slide at ``slide_path`` (``mpp``: a um/px the user set, else the file's);
        ``regions`` are the drawn regions (polygons in um) that group nuclei for the
        train/validation split. The default writes the points and a one-row table
        (``slide,nuclei,mpp``, the file form of labelled nuclei) to a temporary folder and
        reads them with :meth:`read_data`; an item of the result that is a dataclass with
        ``xy_um`` and ``region_ids`` fields gets each nucleus's region (-1: none). A family
        overrides it to skip the files.
        """
        import csv
        import tempfile

        from napari_pathology.nuclei.points import write_csv

        with tempfile.TemporaryDirectory(prefix="napari-pathology-nuclei-") as folder:
            labels, table = Path(folder) / "nuclei.csv", Path(folder) / "slides.csv"
            write_csv(points, labels)
            with open(table, "w", newline="", encoding="utf-8") as fh:
                row = (str(Path(slide_path).absolute()), str(labels), "" if mpp is None else repr(float(mpp)))
                csv.writer(fh).writerows([("slide", "nuclei", "mpp"), row])
            data = self.read_data(table)
        if not regions:
            return data
        from napari_pathology.geometry import points_in_polygons

        def with_regions(item: Any) -> Any:
            names = {f.name for f in dataclasses.fields(item)} if dataclasses.is_dataclass(item) else set()
            if {"xy_um", "region_ids"} <= names:
                return dataclasses.replace(item, region_ids=points_in_polygons(item.xy_um, regions))
            return item

        return [with_regions(item) for item in data] if isinstance(data, list) else with_regions(data)

    def check_table(self, entries: list[Any]) -> dict[str, Any]:
        """Check a slide table before training; returns settings it implies (e.g. ``classes``)."""
        return {}

    def train(
        self,
        settings: Any,
        data: Any,
        out: str | os.PathLike[str],
        stop: threading.Event | None = None,
    ) -> Generator[Any, None, Any]:
        """Train: a generator of :class:`~napari_pathology.training.TrainEvent`, returns a ``TrainResult``.

        The one trainer signature of every family: ``settings`` from
        :meth:`make_settings`, ``data`` from :meth:`read_data` (or the panel),
        ``out`` the best checkpoint's path, ``stop`` an event that ends the
        job cleanly after the next save.
        """
        raise NotImplementedError(f"family {self.name!r} cannot be trained")

    def loss(self) -> Callable[..., Any] | None:
        """The loss ``fit`` uses, ``loss(output, targets) -> tensor`` (None: cross-entropy).

        ``output`` is what the trainer's forward returned: the logits, or a
        ``(logits, extras)`` pair or a mapping with ``"logits"`` (see
        :func:`napari_pathology.training.loop.fit`).
        """
        return None

    # ------------------------------------------------------------------ other tools' files
    def import_checkpoint(self, path: str | os.PathLike[str], classes: Any = None) -> Any:
        """A model from a checkpoint written by the family's original code (e.g. a bare state dict).

        Called for a PyTorch file that is not a napari-pathology checkpoint.
        Return None when the file is not the family's; raise
        :class:`~napari_pathology.models.ModelError` (one line) when it is but
        cannot be loaded. ``classes`` names the classes (a comma-separated
        string or a sequence) when the file does not.
        """
        return None

    def export_formats(self) -> dict[str, Callable[[Any, Path], Path]]:
        """Other tools' formats a trained model can be written in: ``{name: write(model, path) -> path}``."""
        return {}

    # ------------------------------------------------------------------ inference
    def run(
        self,
        slide: Any,
        model: Any,
        *,
        tissue: Any = None,
        settings: Any = None,
        out_dir: str | os.PathLike[str] | None = None,
        reuse: bool = True,
        on_saved: Callable[[Any], None] | None = None,
        cancel: threading.Event | None = None,
        **options: Any,
    ) -> Generator[Any, None, Any]:
        """Run ``model`` over ``slide``: yields progress, returns a result (``summary()``, ``partial``).

        The default is the runner of the family's input kind
        (:func:`napari_pathology.analysis.runner_for`); ``options`` are that
        runner's own (e.g. ``features_file`` for the bag runner).
        """
        from napari_pathology.analysis.runners import runner_for

        runner = runner_for(self.input_kind)
        return runner(
            slide, model, tissue=tissue, settings=settings, out_dir=out_dir, reuse=reuse,
            on_saved=on_saved, cancel=cancel, **options,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"<Family {self.name!r} ({self.input_kind})>"
