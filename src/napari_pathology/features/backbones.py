"""Built-in encoders from torchvision: CLAM's truncated ResNet-50 and any torchvision backbone by name.

``resnet50-trunc`` is the encoder of Lu et al. 2021 (CLAM): torchvision's
ResNet-50 up to and including ``layer3`` (1024 channels), then adaptive
average pooling, so every patch becomes a 1024-d vector; ImageNet
normalisation, 256 px patches at 0.5 um/px (20x).

``torchvision:<model>`` is any classification network of
``torchvision.models`` (``torchvision:resnet18``, ``torchvision:densenet121``...)
with its final linear classifier removed, so it returns the pooled features
that fed the classifier.

ImageNet weights are found in torch's cache under the file names of
torchvision's own weight enums (``resnet50-0676ba61.pth``...), or given as a
path; nothing is downloaded. Without weights the encoder is built untrained
and says so (initialised from a fixed seed, so its features, and their
cache, are the same from run to run).

No Qt, no napari.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_pathology._native import import_torchvision
from napari_pathology.features.encoders import (
    Encoder,
    EncoderEntry,
    EncoderError,
    load_state_dict,
    load_weights_into,
    register_encoder,
    register_encoder_prefix,
    torch_cache_dir,
)

__all__ = [
    "CLAM_MPP",
    "CLAM_PATCH_SIZE",
    "ResNet50Trunc",
    "build_resnet50_trunc",
    "build_torchvision",
    "cached_torchvision",
    "cached_weights",
    "torchvision_entry",
]

log = logging.getLogger(__name__)

#: CLAM's patches: 256 px at 0.5 um/px (20x).
CLAM_PATCH_SIZE = 256
CLAM_MPP = 0.5
#: Torchvision's default input side for a backbone without a known crop size.
_DEFAULT_SIDE = 224
#: File names of ResNet-50 ImageNet weights besides torchvision's enum: the legacy name CLAM's code downloads.
_LEGACY_RESNET50 = ("resnet50-19c8e357.pth",)


def _models() -> Any:
    return import_torchvision("torchvision.models")


def _weight_files(arch: str) -> list[str]:
    """File names of ``arch``'s weights in torchvision's enum (V1 first), empty when it has none."""
    try:
        enum = _models().get_model_weights(arch)
    except (ValueError, KeyError):
        return []
    return [Path(w.url).name for w in enum]


def cached_weights(arch: str) -> Path | None:
    """The first of ``arch``'s torchvision weight files present in torch's cache, or None."""
    names = _weight_files(arch) + (list(_LEGACY_RESNET50) if arch == "resnet50" else [])
    cache = torch_cache_dir()
    for name in names:
        if (cache / name).is_file():
            return cache / name
    return None


def cached_torchvision() -> dict[str, Path]:
    """``{model: weights file}`` of torchvision classification networks whose weights are in torch's cache."""
    cache = torch_cache_dir()
    present = {p.name for p in cache.glob("*.pth")} if cache.is_dir() else set()
    if not present:
        return {}
    models = _models()
    found = {}
    for arch in models.list_models(module=models):
        for name in _weight_files(arch):
            if name in present:
                found[arch] = cache / name
                break
    return found


@contextlib.contextmanager
def _seeded(untrained: bool) -> Iterator[None]:
    """An untrained network is initialised from a fixed seed: the same weights (and cache) every run."""
    if not untrained:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _untrained(name: str, arch: str) -> dict[str, Any]:
    where = torch_cache_dir()
    message = (
        f"encoder {name}: no {arch} weights in {where} and none given (--weights); it is UNTRAINED "
        "(random initialisation) and its features mean little"
    )
    log.warning(message)
    return {"weights": None, "source": "random initialisation (no trained weights found)", "warning": message}


def _trained(path: Path) -> dict[str, Any]:
    import hashlib

    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()[:16]
    return {"weights": str(path), "source": f"state dict from {path.name}", "file_sha256": digest}


class ResNet50Trunc(nn.Module):
    """ResNet-50 up to ``layer3``, then adaptive average pooling: ``(B, 3, H, W) -> (B, 1024)``.

    Its parameters keep torchvision's names (``conv1``, ``layer3.5.bn3``...), so
    its state dict is the first part of a ResNet-50's.
    """

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        for part in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"):
            setattr(self, part, getattr(resnet, part))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled ``layer3`` features ``(B, 1024)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


def build_resnet50_trunc(weights: str | Path | None = None) -> Encoder:
    """CLAM's encoder: ResNet-50 truncated after ``layer3`` + adaptive average pooling (1024-d).

    Parameters
    ----------
    weights : path-like, optional
        A state dict of a full torchvision ResNet-50 (``conv1``...``fc``) or of
        the truncated network (``conv1``...``layer3`` names); None: untrained.

    Raises
    ------
    EncoderError
        A file that is not ResNet-50 weights.
    """
    with _seeded(weights is None):
        resnet = _models().resnet50(weights=None)
    if weights is None:
        provenance = _untrained("resnet50-trunc", "ResNet-50")
    else:
        path = Path(weights).expanduser()
        state = load_state_dict(path)
        if any(k.startswith(("layer4.", "fc.")) for k in state):
            load_weights_into(resnet, state, path, "ResNet-50")
        else:  # a truncated network's own state dict (conv1 ... layer3)
            head = {k: v for k, v in resnet.state_dict().items() if k.startswith(("layer4.", "fc."))}
            load_weights_into(resnet, {**state, **head}, path, "truncated ResNet-50")
        provenance = _trained(path)
    net = ResNet50Trunc(resnet)
    return Encoder(
        "resnet50-trunc", net, 1024, CLAM_PATCH_SIZE, CLAM_MPP, "imagenet",
        trained=weights is not None, provenance={"architecture": "torchvision resnet50[:layer3] + avgpool",
                                                 **provenance},
    )  # fmt: skip


# --------------------------------------------------------------------------- any torchvision backbone


def _set_module(root: Any, dotted: str, module: Any) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _strip_classifier(net: Any, arch: str) -> None:
    """Replace the last linear layer (the classifier) by identity; refuse networks without one."""
    linears = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise EncoderError(
            f"torchvision:{arch} has no linear classifier to remove; it is not a backbone here"
        )
    _set_module(net, linears[-1], nn.Identity())


def build_torchvision(arch: str, weights: str | Path | None = None, patch_size: int | None = None) -> Encoder:
    """A torchvision classification network without its classifier: pooled features.

    Parameters
    ----------
    arch : str
        A name of ``torchvision.models.list_models()`` (e.g. ``resnet18``).
    weights : path-like, optional
        A state dict of that network (with its classifier); None: untrained.
    patch_size : int, optional
        Tile side used to measure the feature width (default: the weights' crop size or 224).

    Raises
    ------
    EncoderError
        Unknown model, or a file that is not its weights.
    """
    models = _models()
    name = f"torchvision:{arch}"
    if arch not in models.list_models(module=models):
        raise EncoderError(
            f"unknown torchvision model {arch!r} for encoder {name!r} "
            "(see torchvision.models.list_models(), e.g. resnet18, densenet121)"
        )
    kwargs: dict[str, Any] = {}
    if arch in ("inception_v3", "googlenet"):  # their ImageNet files hold the auxiliary heads
        kwargs = {"aux_logits": True, "init_weights": False}
    with _seeded(weights is None):
        net = models.get_model(arch, weights=None, **kwargs)
    if weights is None:
        provenance = _untrained(name, arch)
    else:
        path = Path(weights).expanduser()
        state = load_state_dict(path)
        load_weights_into(net, state, path, arch)
        provenance = _trained(path)
        if hasattr(net, "transform_input"):  # as torchvision does for these ported weights
            net.transform_input = True
    for aux in ("AuxLogits", "aux1", "aux2"):
        if getattr(net, aux, None) is not None:
            setattr(net, aux, None)
    if hasattr(net, "aux_logits"):
        net.aux_logits = False
    _strip_classifier(net, arch)
    side = patch_size or _crop_size(arch) or _DEFAULT_SIDE
    net.eval()
    with torch.inference_mode():
        probe = net(torch.zeros(1, 3, side, side))
    if probe.ndim != 2:
        raise EncoderError(f"{name} gives features of shape {tuple(probe.shape[1:])}, not a vector")
    return Encoder(
        name, net, int(probe.shape[1]), side, CLAM_MPP, "imagenet", trained=weights is not None,
        provenance={"architecture": f"torchvision {arch} without its classifier", **provenance},
    )  # fmt: skip


def _crop_size(arch: str) -> int | None:
    try:
        first = next(iter(_models().get_model_weights(arch)))
        crop = first.transforms().crop_size
        return int(crop[0] if isinstance(crop, list | tuple) else crop)
    except Exception:  # no weights enum, or transforms without a crop size
        return None


def torchvision_entry(arch: str) -> EncoderEntry:
    """The registry entry of ``torchvision:<arch>`` (built on demand; weights looked up in torch's cache)."""
    if not arch:
        raise EncoderError("torchvision: needs a model name, e.g. torchvision:resnet18")
    return EncoderEntry(
        name=f"torchvision:{arch}",
        builder=partial(build_torchvision, arch),
        dim=None,
        patch_size=None,
        mpp=CLAM_MPP,
        normalization="imagenet",
        description=f"torchvision {arch} without its classifier (pooled features)",
        find_weights=partial(cached_weights, arch),
    )


register_encoder(
    "resnet50-trunc",
    build_resnet50_trunc,
    dim=1024,
    patch_size=CLAM_PATCH_SIZE,
    mpp=CLAM_MPP,
    normalization="imagenet",
    description="CLAM's encoder: ResNet-50 truncated after layer3 + average pooling (Lu et al. 2021)",
    find_weights=partial(cached_weights, "resnet50"),
)
register_encoder_prefix("torchvision", torchvision_entry)
