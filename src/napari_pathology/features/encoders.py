"""The encoder registry: networks that turn a tile into one feature vector.

An :class:`Encoder` is a frozen network ``(B, 3, H, W) -> (B, dim)`` with
what it needs to be used right: the patch size and um/px it expects, its
input normalisation and whether its weights are trained (and from where:
``provenance``). Encoders are registered by name (:func:`register_encoder`)
with a builder ``builder(weights) -> Encoder`` and, optionally, a function
that finds trained weights on this machine (:func:`list_encoders` shows
which were found). :func:`get_encoder` builds one on a device.

Weights are never downloaded: they come from a path the user gives, or from
files already in torch's own cache (``torch.hub.get_dir()/checkpoints``),
loaded here as a state dict with ``weights_only=True``. An encoder built
without weights says so (a warning, ``trained=False`` in its provenance).

Model families register their own encoders from their folders; nothing here
names a family. No Qt, no napari.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_pathology.tiles import NORMALIZATIONS

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "Encoder",
    "EncoderEntry",
    "EncoderError",
    "get_encoder",
    "list_encoders",
    "load_state_dict",
    "load_weights_into",
    "register_encoder",
    "register_encoder_prefix",
    "torch_cache_dir",
]


class EncoderError(ValueError):
    """An encoder that cannot be built as asked (unknown name, a wrong weights file); one line."""


@dataclass
class Encoder:
    """A frozen network that maps tiles to feature vectors, with what it expects.

    Attributes
    ----------
    name : str
        Registered name (e.g. ``resnet50-trunc``).
    net : nn.Module
        ``(B, 3, H, W)`` normalised float -> ``(B, dim)``; kept in eval mode.
    dim : int
        Feature width.
    patch_size : int
        Default tile side in px at ``mpp``.
    mpp : float
        Default um/px of the tiles.
    normalization : str
        Input normalisation, one of :data:`napari_pathology.tiles.NORMALIZATIONS`.
    trained : bool
        Whether the weights are trained (False: random initialisation).
    provenance : dict
        Where the weights came from (``weights``, ``source``, ``trained``...), JSON-ready.

    """

    name: str
    net: nn.Module
    dim: int
    patch_size: int
    mpp: float
    normalization: str
    trained: bool
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise EncoderError(
                f"encoder {self.name!r}: unknown normalization {self.normalization!r} "
                f"(known: {', '.join(NORMALIZATIONS)})"
            )
        self.net.requires_grad_(False)
        self.net.eval()
        self.provenance = {"encoder": self.name, "trained": bool(self.trained), **self.provenance}

    @property
    def device(self) -> torch.device:
        """Where the network's weights are."""
        import torch

        first = next(self.net.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def to(self, device: Any) -> Encoder:
        """Move the network to ``device`` (a name such as ``"auto"`` or a ``torch.device``); returns self."""
        from napari_pathology.devices import resolve_device

        target = device if not isinstance(device, str | type(None)) else resolve_device(device)
        self.net.to(target).eval()
        return self

    def digest(self) -> str:
        """Short SHA-256 of the weights (changes when any weight changes)."""
        from napari_pathology.models.checkpoint import tensors_digest

        return tensors_digest(self.net.state_dict())[:16]

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        """Features ``(B, dim)`` float32 of RGB uint8 tiles ``(B, H, W, 3)``."""
        import torch

        from napari_pathology.tiles import to_tensor

        with torch.inference_mode():
            out = self.net(to_tensor(tiles, self.normalization, self.device))
        out = out.float().reshape(len(out), -1).cpu().numpy()
        if out.shape[1] != self.dim:
            raise EncoderError(
                f"encoder {self.name!r} gave {out.shape[1]} features, not the declared {self.dim}"
            )
        return out


@dataclass(frozen=True)
class EncoderEntry:
    """What the registry knows of an encoder without building it.

    ``dim``, ``patch_size`` and ``mpp`` are None when the weights decide them
    (a family's trunk taken from a checkpoint).
    """

    name: str
    builder: Callable[[Any], Encoder]
    dim: int | None
    patch_size: int | None
    mpp: float | None
    normalization: str
    description: str = ""
    find_weights: Callable[[], Any] | None = None

    def default_weights(self) -> Any:
        """Trained weights found on this machine (a path or a name), or None."""
        return self.find_weights() if self.find_weights is not None else None


_ENCODERS: dict[str, EncoderEntry] = {}
_PREFIXES: dict[str, Callable[[str], EncoderEntry]] = {}
_LOCK = threading.RLock()


def register_encoder(
    name: str,
    builder: Callable[[Any], Encoder],
    *,
    dim: int | None,
    patch_size: int | None,
    mpp: float | None,
    normalization: str = "imagenet",
    description: str = "",
    find_weights: Callable[[], Any] | None = None,
) -> EncoderEntry:
    """Register an encoder under ``name``.

    Parameters
    ----------
    name : str
        Unique name (no ``:``; prefixes such as ``torchvision:`` are for :func:`register_encoder_prefix`).
    builder : callable
        ``builder(weights) -> Encoder``; ``weights`` is what the user gave (or
        ``find_weights()`` found), None to build untrained.
    dim, patch_size, mpp : int, int, float or None
        Feature width, default tile side (px) and um/px; None when the weights decide.
    normalization : str
        Input normalisation.
    description : str
        One line for listings.
    find_weights : callable, optional
        Returns trained weights found on this machine, or None; must be cheap.

    Returns
    -------
    EncoderEntry

    Raises
    ------
    ValueError
        When another builder already holds the name.
    """
    if not name or ":" in name:
        raise ValueError(f"an encoder name must be non-empty without ':', got {name!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r} (known: {', '.join(NORMALIZATIONS)})")
    entry = EncoderEntry(name, builder, dim, patch_size, mpp, normalization, description, find_weights)
    with _LOCK:
        known = _ENCODERS.get(name)
        if known is not None and getattr(known.builder, "__qualname__", None) != getattr(
            builder, "__qualname__", object()
        ):
            raise ValueError(f"a different encoder named {name!r} is already registered")
        _ENCODERS[name] = entry
    return entry


def register_encoder_prefix(prefix: str, resolver: Callable[[str], EncoderEntry]) -> None:
    """Register a family of names ``prefix:<rest>``; ``resolver(rest)`` returns its entry (or raises)."""
    with _LOCK:
        _PREFIXES[prefix] = resolver


def _load_families() -> None:
    from napari_pathology.families import load_families

    load_families()  # families register their own encoders


def _entry(name: str) -> EncoderEntry:
    prefix, sep, rest = str(name).partition(":")
    if sep:
        resolver = _PREFIXES.get(prefix)
        if resolver is None:
            raise EncoderError(
                f"unknown encoder prefix {prefix!r} in {name!r} (known: {', '.join(_PREFIXES)})"
            )
        return resolver(rest)
    if name not in _ENCODERS:
        _load_families()
    try:
        return _ENCODERS[name]
    except KeyError:
        known = ", ".join([*sorted(_ENCODERS), *(f"{p}:<model>" for p in sorted(_PREFIXES))])
        raise EncoderError(f"unknown encoder {name!r} (known: {known})") from None


def list_encoders() -> list[EncoderEntry]:
    """Registered encoders by name (the families' included)."""
    _load_families()
    with _LOCK:
        return [_ENCODERS[name] for name in sorted(_ENCODERS)]


def get_encoder(name: str, weights: Any = None, device: Any = "cpu") -> Encoder:
    """Build the encoder ``name`` on ``device``.

    Parameters
    ----------
    name : str
        A registered name, or ``prefix:<model>`` (e.g. ``torchvision:resnet18``).
    weights : path-like or str, optional
        Weights to load (a file; for a family's encoder also a registered model
        name). Default: trained weights found on this machine, else untrained
        (with a warning).
    device : str or torch.device
        ``cpu``, ``cuda``, ``cuda:N``, ``auto``...

    Returns
    -------
    Encoder

    Raises
    ------
    EncoderError
        Unknown name, or weights that do not fit (one line naming the file).
    """
    entry = _entry(name)
    if weights is None:
        weights = entry.default_weights()
    encoder = entry.builder(weights)
    return encoder.to(device)


# --------------------------------------------------------------------------- weights on disk


def torch_cache_dir() -> Path:
    """Where torch keeps downloaded weights (``torch.hub.get_dir()/checkpoints``; honours ``TORCH_HOME``)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def load_state_dict(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A state dict from a file (safely: ``weights_only=True``); ``module.`` prefixes removed.

    A checkpoint that wraps its state dict (``{"state_dict": ...}`` or
    ``{"model": ...}``) is unwrapped.

    Raises
    ------
    EncoderError
        Not a file, not a PyTorch file, or not a state dict (one line naming the file).
    """
    import torch

    from napari_pathology.fileio import require_regular_file

    try:
        path = require_regular_file(path, what)
    except (FileNotFoundError, ValueError) as error:
        raise EncoderError(str(error)) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and tensor errors alike: the file is not weights
        reason = " ".join(str(error).split())[:160]
        raise EncoderError(
            f"{path} is not a PyTorch weights file ({type(error).__name__}: {reason})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise EncoderError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def load_weights_into(net: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, arch: str) -> None:
    """Load ``state`` into ``net`` exactly (every name, every shape), or refuse naming the file.

    Raises
    ------
    EncoderError
        Missing, unexpected or mis-shaped tensors, summarised in one line.
    """
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", shapes)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise EncoderError(f"{path} does not hold {arch} weights: {'; '.join(parts)} tensors")
    net.load_state_dict(dict(state), strict=True)
