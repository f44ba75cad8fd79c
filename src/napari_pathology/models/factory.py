"""Building models: from the registry, from a checkpoint file, or from either by name or path.

:func:`create_model` builds a registered name (or any spec of a registered
family) wrapped in :class:`PathologyModel`, which carries its spec;
:func:`load_checkpoint` builds the model a checkpoint file describes
(read safely by :mod:`napari_pathology.models.checkpoint`) and loads its
weights; :func:`resolve_model` accepts either a registered name or a
checkpoint path.

No Qt, no napari.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_pathology.models.checkpoint import (
    CHECKPOINT_SUFFIXES,
    ForeignCheckpointError,
    _few,
    read_checkpoint,
)
from napari_pathology.models.registry import _BUILDERS, _LOCK, _SPECS, get_spec, pretrained_path
from napari_pathology.models.spec import ModelError, ModelSpec

__all__ = ["PathologyModel", "create_model", "import_foreign_checkpoint", "load_checkpoint", "resolve_model"]


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


def load_checkpoint(
    path: str | os.PathLike[str], map_location: Any = "cpu", classes: Any = None
) -> PathologyModel:
    """Build the model a checkpoint describes and load its weights (safely), in eval mode.

    Parameters
    ----------
    path : path-like
        A file written by :func:`save_checkpoint`.
    map_location : str or torch.device
        Device for the returned model (weights are first read onto the CPU).
    classes : str or sequence of str, optional
        Class names for another tool's checkpoint that does not carry them
        (e.g. a CLAM ``s_0_checkpoint.pt``: ``"normal,tumour"``).

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
    try:
        path, data, spec = read_checkpoint(path)
    except ForeignCheckpointError as foreign:
        model = import_foreign_checkpoint(path, classes)
        if model is None:
            raise ModelError(f"{foreign}; no model family recognises its weights") from None
        if isinstance(map_location, str | torch.device):
            model = model.to(map_location)
        return model.eval()
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


def import_foreign_checkpoint(path: str | os.PathLike[str], classes: Any = None) -> PathologyModel | None:
    """A model from another tool's checkpoint, by the first family that recognises it (None: none does)."""
    from napari_pathology.families import list_families

    for family in list_families():
        model = family.import_checkpoint(Path(path), classes)
        if model is not None:
            return model
    return None


def resolve_model(
    name_or_path: str | os.PathLike[str], map_location: Any = "cpu", classes: Any = None
) -> PathologyModel:
    """A registered model by name, or a model loaded from a checkpoint path.

    ``classes`` names the classes of another tool's checkpoint that does not
    carry them (see :func:`load_checkpoint`).

    Registered names win over same-named files in the working folder; a
    string that names an existing file, contains a path separator or ends
    in a checkpoint suffix is treated as a path.
    """
    if not isinstance(name_or_path, str):
        return load_checkpoint(name_or_path, map_location, classes)
    with _LOCK:
        registered = name_or_path in _SPECS
    if not registered:  # a family installed, or its weights pending, since the registry was imported
        from napari_pathology.families import load_families

        load_families()
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
        return load_checkpoint(candidate, map_location, classes)
    with _LOCK:
        available = sorted(_SPECS)
    raise ModelError(
        f"{name_or_path!r} is neither a registered model ({', '.join(available) or 'none'}) "
        "nor a checkpoint file"
    )
