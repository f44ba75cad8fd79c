"""One registry of models: specs, builders, creation and safe checkpoints.

A :class:`ModelSpec` says everything the engine needs to run a model
correctly: family, classes, input size and um/px, label (centre) region,
stride, input normalisation, output kind and slide-level aggregator. A
*family* has one builder, a function ``builder(**config) -> nn.Module``
returning logits ``(B, n_classes)``; a *name* is a spec of a family. Both are
registered with :func:`register_model` (timm style)::

    @register_model(ModelSpec(name="my-model", family="mine", ...))
    def build_mine(**config) -> nn.Module: ...

:func:`create_model` builds a registered name (or any spec of a registered
family) wrapped in :class:`PathologyModel`, which carries its spec.
Checkpoints are single files holding the spec, the weights, a SHA-256
digest of the weights and free-form provenance and metrics; they are written
atomically (:func:`napari_pathology.fileio.atomic_write`) and read with
``torch.load(weights_only=True)``, because a checkpoint is untrusted input: a
file holding pickled code is refused as such (:func:`load_untrusted`), and
weights that no longer match their digest (a flipped byte) are refused as
damaged. Checkpoints written before the digest existed still load.
:func:`resolve_model` accepts either a registered name or a checkpoint path.

No Qt, no napari.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import math
import os
import pickletools
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_pathology.fileio import atomic_write, require_regular_file
from napari_pathology.tiles import NORMALIZATIONS

__all__ = [
    "AGGREGATORS",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "OUTPUTS",
    "Builder",
    "ModelError",
    "ModelSpec",
    "PathologyModel",
    "checkpoint_info",
    "create_model",
    "get_spec",
    "list_families",
    "list_models",
    "load_checkpoint",
    "load_untrusted",
    "pretrained_path",
    "refused_as_code",
    "register_family",
    "register_model",
    "register_pretrained",
    "register_spec",
    "resolve_model",
    "save_checkpoint",
    "save_torch_file",
    "tensors_digest",
]

CHECKPOINT_FORMAT = "napari-pathology-checkpoint"
CHECKPOINT_VERSION = 1
OUTPUTS = ("heatmap", "points", "slide", "nuclei")
AGGREGATORS = ("max", "mean", "fraction", "attention")
#: File endings treated as checkpoint paths by :func:`resolve_model`.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

Builder = Callable[..., nn.Module]

_REGISTERED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class ModelError(ValueError):
    """A model cannot be found, built or loaded; the message says which and why."""


# --------------------------------------------------------------------------- spec


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


# --------------------------------------------------------------------------- registry

_LOCK = threading.RLock()
_BUILDERS: dict[str, Builder] = {}
_SPECS: dict[str, ModelSpec] = {}
_PRETRAINED: dict[str, Path] = {}


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    key = lambda f: (getattr(f, "__module__", None), getattr(f, "__qualname__", None))  # noqa: E731
    return a is b or key(a) == key(b)


def register_family(family: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(**config) -> nn.Module`` for a family.

    Registering the same function again (e.g. on module reload) is fine; a
    different builder for a taken family raises :class:`ModelError`.
    """
    if not isinstance(family, str) or not family.strip():
        raise ModelError(f"a model family needs a non-empty name, got {family!r}")

    def decorator(builder: Builder) -> Builder:
        if not callable(builder):
            raise ModelError(f"the builder of family {family!r} must be callable")
        with _LOCK:
            known = _BUILDERS.get(family)
            if known is not None and not _same_function(known, builder):
                raise ModelError(
                    f"model family {family!r} is already registered "
                    f"by {known.__module__}.{known.__qualname__}"
                )
            _BUILDERS[family] = builder
        return builder

    return decorator


def register_spec(spec: ModelSpec) -> ModelSpec:
    """Register a named spec of an already registered family (returns it)."""
    if not isinstance(spec, ModelSpec):
        raise ModelError(f"register_spec needs a ModelSpec, got {type(spec).__name__}")
    if not _REGISTERED_NAME.match(spec.name):
        raise ModelError(
            f"registered model names use letters, digits, '-' and '_' only (no dots or spaces): {spec.name!r}"
        )
    with _LOCK:
        if spec.family not in _BUILDERS:
            raise ModelError(f"model {spec.name!r}: family {spec.family!r} has no registered builder")
        known = _SPECS.get(spec.name)
        if known is not None and known != spec:
            raise ModelError(f"a different model named {spec.name!r} is already registered")
        _SPECS[spec.name] = spec
    return spec


def register_model(spec: ModelSpec) -> Callable[[Builder], Builder]:
    """Decorator registering a builder for ``spec.family`` and ``spec`` under ``spec.name``.

    Stack it to register several names of one family with the same builder.

    Examples
    --------
    >>> @register_model(ModelSpec("tiny-demo", "tiny-demo", "demo", ("a", "b"), 8, 1.0))  # doctest: +SKIP
    ... def build_tiny(**config):
    ...     return nn.Sequential(nn.Flatten(), nn.LazyLinear(2))

    """
    if not isinstance(spec, ModelSpec):
        raise ModelError(f"register_model needs a ModelSpec, got {type(spec).__name__}")

    def decorator(builder: Builder) -> Builder:
        register_family(spec.family)(builder)
        register_spec(spec)
        return builder

    return decorator


def register_pretrained(path: str | os.PathLike[str], name: str | None = None) -> ModelSpec | None:
    """Register a checkpoint file under its spec's name (or ``name``): ``create_model`` then loads it.

    Used for weights shipped with the package. A missing or unreadable file
    is skipped with a warning (returns None), so one broken file never hides
    the other models.
    """
    import logging

    path = Path(path)
    try:
        _, _, spec = _read_checkpoint(path)
    except (ModelError, OSError) as error:
        logging.getLogger(__name__).warning("pretrained model %s not registered: %s", path, error)
        return None
    if name is not None:
        spec = spec.replace(name=name)
    with _LOCK:
        if spec.family not in _BUILDERS:
            logging.getLogger(__name__).warning(
                "pretrained model %s not registered: family %r unknown", path, spec.family
            )
            return None
        _SPECS[spec.name] = spec
        _PRETRAINED[spec.name] = path
    return spec


def pretrained_path(name: str) -> Path | None:
    """The checkpoint behind a registered pretrained name, or None for a builder-only name."""
    with _LOCK:
        return _PRETRAINED.get(name)


def list_models() -> list[ModelSpec]:
    """Every registered spec, sorted by name."""
    with _LOCK:
        return [_SPECS[name] for name in sorted(_SPECS)]


def list_families() -> list[str]:
    """Every registered family, sorted."""
    with _LOCK:
        return sorted(_BUILDERS)


def get_spec(name: str) -> ModelSpec:
    """The registered spec called ``name``; :class:`ModelError` listing the names when unknown."""
    with _LOCK:
        spec = _SPECS.get(name)
    if spec is None:  # perhaps a model of a family installed since the registry was imported
        from napari_pathology.families import load_families

        load_families()
    with _LOCK:
        spec = _SPECS.get(name)
        available = sorted(_SPECS)
    if spec is None:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(available) or '(none)'}")
    return spec


# --------------------------------------------------------------------------- models


class PathologyModel(nn.Module):
    """A network with its :class:`ModelSpec`.

    ``forward`` takes a normalised ``(B, 3, H, W)`` float batch (see
    :func:`napari_pathology.tiles.to_tensor` with ``spec.normalization``) and
    returns logits ``(B, n_classes)``.

    Attributes
    ----------
    spec : ModelSpec
        What the model is and how to run it.
    net : nn.Module
        The family's network.
    source : str
        ``"registry"`` or the checkpoint path it was loaded from.
    provenance, metrics : dict
        From the checkpoint (empty for registry models).

    """

    def __init__(self, net: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self.source = "registry"
        self.provenance: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}

    @property
    def classes(self) -> tuple[str, ...]:
        """Output classes in logit order."""
        return self.spec.classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)``."""
        return self.net(x)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, n_classes)`` (softmax of the logits, float32, no gradients)."""
        logits = self(x)
        if logits.ndim != 2 or logits.shape[1] != self.spec.n_classes:
            raise ModelError(
                f"model {self.spec.name!r} returned shape {tuple(logits.shape)}, "
                f"expected (batch, {self.spec.n_classes}) for classes {list(self.spec.classes)}"
            )
        return torch.softmax(logits.float(), dim=1)

    def extra_repr(self) -> str:
        """The spec's name, family and input, for ``print(model)``."""
        spec = self.spec
        return f"spec={spec.name!r} ({spec.family}, {spec.input_size}px @ {spec.mpp:g} um/px)"


def _build(spec: ModelSpec) -> nn.Module:
    with _LOCK:
        builder = _BUILDERS.get(spec.family)
        families = sorted(_BUILDERS)
    if builder is None:
        raise ModelError(
            f"model {spec.name!r} is of family {spec.family!r}, which this installation does not know "
            f"(known families: {', '.join(families) or '(none)'})"
        )
    config = dict(spec.config)
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        params = {}
    if "num_classes" in params and "num_classes" not in config:
        config["num_classes"] = spec.n_classes
    try:
        net = builder(**config)
    except (TypeError, ValueError) as exc:
        raise ModelError(
            f"model {spec.name!r}: config {spec.config} does not fit family {spec.family!r}: {exc}"
        ) from exc
    if not isinstance(net, nn.Module):
        raise ModelError(
            f"the builder of family {spec.family!r} returned {type(net).__name__}, not an nn.Module"
        )
    return net


def create_model(name_or_spec: str | ModelSpec, **config_overrides: Any) -> PathologyModel:
    """Build a registered model (or any spec of a registered family), in eval mode.

    Parameters
    ----------
    name_or_spec : str or ModelSpec
        A registered name or a spec.
    **config_overrides
        Replace entries of the spec's builder ``config`` (the returned
        model's spec records them).

    Returns
    -------
    PathologyModel

    Raises
    ------
    ModelError
        For an unknown name or family, or a config the builder rejects.

    """
    if isinstance(name_or_spec, str) and pretrained_path(name_or_spec) is not None:
        if config_overrides:
            raise ModelError(f"{name_or_spec!r} is a trained model; its config cannot be changed")
        model = load_checkpoint(pretrained_path(name_or_spec))
        if model.spec.name != name_or_spec:
            model.spec = model.spec.replace(name=name_or_spec)
        return model.eval()
    spec = get_spec(name_or_spec) if isinstance(name_or_spec, str) else name_or_spec
    if not isinstance(spec, ModelSpec):
        raise ModelError(f"create_model needs a model name or a ModelSpec, got {type(spec).__name__}")
    if config_overrides:
        try:
            spec = spec.replace(config={**spec.config, **config_overrides})
        except ValueError as exc:
            raise ModelError(str(exc)) from exc
    model = PathologyModel(_build(spec), spec)
    return model.eval()


# --------------------------------------------------------------------------- checkpoints


def _default_provenance() -> dict[str, Any]:
    from napari_pathology import __version__

    return {
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "napari_pathology": __version__,
        "torch": str(torch.__version__),
    }


def save_checkpoint(
    model: PathologyModel,
    path: str | os.PathLike[str],
    *,
    provenance: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (spec + weights + provenance + metrics) to ``path`` atomically.

    The file is written to a temporary file in the same folder and moved
    into place with :func:`os.replace`, so a crash or an error mid-write
    leaves any previous checkpoint at ``path`` intact.

    Parameters
    ----------
    model : PathologyModel
        The model to save (weights are copied to the CPU).
    path : path-like
        Destination file (``.pt`` by convention); folders are created.
    provenance : dict, optional
        How the model came to be (data, settings, epochs...); JSON-like
        values. Saving time and versions are added.
    metrics : dict, optional
        Validation results; JSON-like values.

    Returns
    -------
    Path
        The written file.

    """
    spec = getattr(model, "spec", None)
    if not isinstance(model, nn.Module) or not isinstance(spec, ModelSpec):
        raise ModelError("save_checkpoint needs a PathologyModel (a module with a ModelSpec as .spec)")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "spec": spec.to_dict(),
        "state_dict": state,
        "weights_sha256": tensors_digest(state),
        "provenance": {**_default_provenance(), **_plain(provenance or {}, "provenance")},
        "metrics": _plain(metrics or {}, "metrics"),
    }
    return save_torch_file(payload, path)


def save_torch_file(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` of ``obj`` to ``path`` through :func:`napari_pathology.fileio.atomic_write`.

    The file is serialised in memory first, so that a full or read-only disk
    surfaces as a one-line :class:`~napari_pathology.fileio.OutputError`
    naming the folder (torch's own writer reports it as an opaque
    ``RuntimeError``), and the previous file at ``path`` stays intact.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(path, buffer.getvalue())


def tensors_digest(obj: Any) -> str:
    """SHA-256 (hex) of every tensor in ``obj`` (nested dicts, lists, tuples): names, dtypes, shapes, bytes.

    Saved with each checkpoint and checked on load, so that a changed byte in
    the weights is refused instead of silently changing the model's output.
    """
    digest = hashlib.sha256()

    def walk(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{where}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
            if tensor.numel():
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            for key in sorted(value, key=str):
                walk(value[key], f"{where}/{key}")
        elif isinstance(value, list | tuple):
            for k, item in enumerate(value):
                walk(item, f"{where}[{k}]")

    walk(obj, "")
    return digest.hexdigest()


#: Pickle opcodes that build or call arbitrary objects (never in a plain ``torch.save`` of tensors).
_CODE_OPCODES = frozenset({"STACK_GLOBAL", "INST", "OBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"})
#: Wordings of torch's refusals of a pickled global, old and new, matched case-insensitively.
_CODE_WORDS = re.compile(
    r"global|unsupported class|unrecognized function|can only (create new object|build)", re.IGNORECASE
)
#: Bytes of a pickle scanned for code (a model's pickle is small; its weights are separate records).
_MAX_PICKLE_SCAN = 64 * 2**20


def _pickle_bytes(path: Path) -> bytes:
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            with archive.open(name) as fh:
                return fh.read(_MAX_PICKLE_SCAN)
    with open(path, "rb") as fh:
        return fh.read(_MAX_PICKLE_SCAN)


def _pickle_holds_code(path: Path) -> bool:
    """Whether the pickle in ``path`` names a global or opcode outside plain tensors (parsed, never run)."""
    try:
        data = _pickle_bytes(path)
    except Exception:
        return False
    stream = io.BytesIO(data)
    for _ in range(8):  # legacy torch files hold several pickles in a row
        try:
            for opcode, arg, _pos in pickletools.genops(stream):
                if opcode.name in _CODE_OPCODES:
                    return True
                if opcode.name == "GLOBAL":
                    module, _, name = str(arg).partition(" ")
                    ordered_dict = (module, name) == ("collections", "OrderedDict")
                    if not (module.split(".")[0] == "torch" or ordered_dict):
                        return True
        except Exception:  # the rest is not a pickle (storages) or is damaged
            return False
        if stream.tell() >= len(data):
            break
    return False


def refused_as_code(error: BaseException, path: str | os.PathLike[str] | None = None) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused a file because it holds pickled code.

    Torch's message is matched case-insensitively in its current and older
    wordings ("Unsupported global: GLOBAL ...", "unsupported GLOBAL ... is
    blocked", "Unsupported class", "unrecognized function"); otherwise the
    pickle in ``path`` is parsed (not run) for globals and object opcodes.
    A torn or truncated file is not code.
    """
    if _CODE_WORDS.search(str(error)):
        return True
    return path is not None and _pickle_holds_code(Path(path))


def load_untrusted(path: str | os.PathLike[str], where: str) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, refused in one line starting with ``where``.

    Raises
    ------
    ModelError
        "``where``: it holds code (pickled objects) that napari-pathology will
        not run" for a hostile or foreign pickle; "not a PyTorch file, or a
        corrupt or truncated one" for anything else torch cannot read.

    """
    try:
        require_regular_file(path, "file")  # a FIFO or device would block the read forever
    except (OSError, ValueError) as exc:
        raise ModelError(f"{where}: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if refused_as_code(exc, path):
            reason = (
                "it holds code (pickled objects) that napari-pathology will not run; "
                "only tensors and plain data are loaded from a file"
            )
        else:
            text = str(exc)
            reason = "not a PyTorch checkpoint file, or a corrupt or truncated one"
            first = text.strip().split("\n")[0].split(". ")[0].strip()
            if first and "Weights only load failed" not in text:
                reason += f" ({first[:160]})"
        raise ModelError(f"{where}: {reason}") from exc


def _read_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], ModelSpec]:
    """Load and check the container; return the path, the raw dict and the validated spec."""
    path = Path(path).expanduser()
    where = f"Cannot load model checkpoint {path.name}"
    if not path.exists():
        raise ModelError(f"{where}: no such file ({path})")
    if path.is_dir():
        raise ModelError(f"{where}: it is a folder, not a checkpoint file ({path})")
    try:
        require_regular_file(path, "checkpoint")  # a FIFO or device would block the read forever
    except (OSError, ValueError) as exc:
        raise ModelError(f"{where}: {exc}") from exc
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelError(f"{where}: {exc}") from exc
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # zip (torch.save) or pickle
        if not magic:
            kind = "an empty file"
        elif magic[:1] in (b"{", b"["):
            kind = "a JSON file"
        else:
            kind = "a text file" if magic.isascii() else "unrecognised data"
        raise ModelError(f"{where}: not a PyTorch checkpoint file ({kind}; expected a file from torch.save)")
    data = load_untrusted(path, where)
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
            reason = (
                f"it is a bare state_dict ({len(data)} tensors) without a model spec; "
                "save it with napari_pathology.models.save_checkpoint"
            )
        else:
            reason = f"it is a PyTorch file but not a {CHECKPOINT_FORMAT} (no 'format' entry)"
        raise ModelError(f"{where}: {reason}")
    version = data.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise ModelError(
            f"{where}: checkpoint version {version!r} is newer than this napari-pathology understands "
            f"(up to {CHECKPOINT_VERSION}); update napari-pathology"
        )
    try:
        spec = ModelSpec.from_dict(data.get("spec"))
    except ValueError as exc:
        raise ModelError(f"{where}: invalid model spec: {exc}") from exc
    state = data.get("state_dict")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{where}: its 'state_dict' is not a mapping of names to tensors")
    digest = data.get("weights_sha256")  # absent in checkpoints written before digests
    if digest is not None and (not isinstance(digest, str) or digest != tensors_digest(state)):
        raise ModelError(
            f"checkpoint {path} is damaged: its weights do not match the digest saved with them "
            "(a byte changed after it was written); use an intact copy or train it again"
        )
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise ModelError(
            f"{where}: its weights hold NaN or infinite values ({_few(broken)}); the model cannot give "
            "meaningful outputs (a training run that diverged?): use an earlier checkpoint"
        )
    return path, data, spec


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> PathologyModel:
    """Build the model a checkpoint describes and load its weights (safely), in eval mode.

    Parameters
    ----------
    path : path-like
        A file written by :func:`save_checkpoint`.
    map_location : str or torch.device
        Device for the returned model (weights are first read onto the CPU).

    Returns
    -------
    PathologyModel
        With ``source`` (the path), ``provenance`` and ``metrics`` set.

    Raises
    ------
    ModelError
        Naming the file, for: a missing file; a file that is not a torch
        checkpoint or not this format; an unknown family; a spec whose
        network does not match the stored weights (missing/unexpected keys,
        shape mismatches).

    """
    path, data, spec = _read_checkpoint(path)
    where = f"Cannot load model checkpoint {path.name}"
    try:
        model = PathologyModel(_build(spec), spec)
    except ModelError as exc:
        raise ModelError(f"{where}: {exc}") from exc
    state = dict(data["state_dict"])
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)} expected"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing weights {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected weights {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_few(shapes)}")
    if problems:
        raise ModelError(
            f"{where}: its weights do not match its spec ({spec.name!r}, family {spec.family!r}): "
            + "; ".join(problems)
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{where}: {exc}") from exc
    model.source = str(path)
    model.provenance = dict(data.get("provenance") or {})
    model.metrics = dict(data.get("metrics") or {})
    if isinstance(map_location, str | torch.device):
        model = model.to(map_location)
    return model.eval()


def checkpoint_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a checkpoint holds, without building the model.

    Returns
    -------
    dict
        ``path``, ``format``, ``version``, ``spec`` (a validated dict),
        ``provenance``, ``metrics``, ``n_tensors`` and ``n_values`` (numbers
        stored).

    Raises
    ------
    ModelError
        As :func:`load_checkpoint`, for files that are not checkpoints.

    """
    path, data, spec = _read_checkpoint(path)
    state = data["state_dict"]
    return {
        "path": str(path),
        "format": data["format"],
        "version": data["version"],
        "spec": spec.to_dict(),
        "provenance": dict(data.get("provenance") or {}),
        "metrics": dict(data.get("metrics") or {}),
        "n_tensors": len(state),
        "n_values": int(sum(t.numel() for t in state.values())),
    }


def resolve_model(name_or_path: str | os.PathLike[str], map_location: Any = "cpu") -> PathologyModel:
    """A registered model by name, or a model loaded from a checkpoint path.

    Registered names win over same-named files in the working folder; a
    string that names an existing file, contains a path separator or ends
    in a checkpoint suffix is treated as a path.
    """
    if not isinstance(name_or_path, str):
        return load_checkpoint(name_or_path, map_location)
    with _LOCK:
        registered = name_or_path in _SPECS
    if registered:
        model = create_model(name_or_path)
        if isinstance(map_location, str | torch.device):
            model = model.to(map_location)
        return model
    candidate = Path(name_or_path).expanduser()
    looks_like_path = (
        candidate.exists()
        or "/" in name_or_path
        or os.sep in name_or_path
        or name_or_path.lower().endswith(CHECKPOINT_SUFFIXES)
    )
    if looks_like_path:
        return load_checkpoint(candidate, map_location)
    with _LOCK:
        available = sorted(_SPECS)
    raise ModelError(
        f"{name_or_path!r} is neither a registered model ({', '.join(available) or 'none'}) "
        "nor a checkpoint file"
    )
