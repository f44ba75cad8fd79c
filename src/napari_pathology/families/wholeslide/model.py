"""The whole-slide CNN of Chen et al. 2021: a ResNet with global max pooling over a whole slide.

torchvision's ResNet (``resnet50`` by default; ``resnet18``/``resnet34`` and
a narrower ``width`` are the same code path, for CPU demos and tests) whose
BatchNorm layers are frozen to their running statistics (an affine map per
channel, so no batch statistics are ever used and tile-by-tile execution is
exact, see :mod:`.streaming`), global **max** pooling (Chen: average pooling
collapsed to AUC 0.65) and one linear layer over the classes. The class
activation map of a class is the last convolutional feature map weighted by
that class's row of the linear layer.

ImageNet weights are loaded when torchvision's ResNet file is in torch's
cache (never downloaded); otherwise the network starts from a fixed-seed
random initialisation, and :attr:`WholeSlideNet.provenance` says which.
No Qt, no napari.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from pathlib import Path

import torch
from torch import nn

from napari_pathology.models.registry import ModelSpec, register_family, register_spec

__all__ = [
    "ARCHS",
    "FAMILY",
    "AffineBatchNorm2d",
    "WholeSlideNet",
    "build_wholeslide",
    "freeze_batch_norm",
    "wholeslide_spec",
]

FAMILY = "wholeslide"
#: Supported torchvision ResNets.
ARCHS = ("resnet18", "resnet34", "resnet50")
#: Chen et al.'s x4 input: about 2.5 um/px.
INPUT_MPP = 2.5
#: Default square input side (px at INPUT_MPP) of the registered spec; Chen used 21,500 px at x4.
INPUT_SIZE = 4096
#: Total stride of a ResNet trunk: one final feature-map pixel per 32 input pixels.
TOTAL_STRIDE = 32


def _torchvision_models():  # the torchvision.models module
    from napari_pathology._native import import_torchvision

    return import_torchvision("torchvision.models")


class AffineBatchNorm2d(nn.Module):
    """BatchNorm with fixed running statistics: ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    The statistics are buffers that never change (no batch statistics, in
    training as in evaluation); ``weight`` and ``bias`` are trainable
    parameters unless ``trainable=False`` (then it is torchvision's
    ``FrozenBatchNorm2d``). State-dict names are BatchNorm2d's, so ImageNet
    weights load; ``num_batches_tracked`` is ignored.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, trainable: bool = True) -> None:
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(num_features), requires_grad=trainable)
        self.bias = nn.Parameter(torch.zeros(num_features), requires_grad=trainable)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel affine map (as torchvision's FrozenBatchNorm2d computes it)."""
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift

    def extra_repr(self) -> str:
        """Features, eps and whether the affine parameters train."""
        return f"{self.weight.shape[0]}, eps={self.eps}, trainable={self.weight.requires_grad}"


def freeze_batch_norm(net: nn.Module, trainable_affine: bool = True) -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``net`` (in place) by :class:`AffineBatchNorm2d` with its statistics.

    Returns ``net``. With ``trainable_affine=False`` the affine parameters are frozen too.
    """
    for name, module in list(net.named_children()):
        if isinstance(module, nn.BatchNorm2d):
            frozen = AffineBatchNorm2d(module.num_features, module.eps, trainable_affine)
            with torch.no_grad():
                if module.affine:
                    frozen.weight.copy_(module.weight)
                    frozen.bias.copy_(module.bias)
                if module.running_mean is not None:
                    frozen.running_mean.copy_(module.running_mean)
                    frozen.running_var.copy_(module.running_var)
            ref = module.running_mean if module.running_mean is not None else module.weight
            if ref is not None:
                frozen.to(device=ref.device, dtype=ref.dtype)
            setattr(net, name, frozen)
        else:
            freeze_batch_norm(module, trainable_affine)
    return net


def _resnet(arch: str, width: int) -> nn.Module:
    """Torchvision's ``arch`` with base width ``width`` (64: torchvision's own network), untrained."""
    models = _torchvision_models()
    net = getattr(models, arch)(weights=None)
    if width == 64:
        return net
    # the same blocks and _make_layer as torchvision's ResNet, narrower: planes width, 2w, 4w, 8w
    block = type(net.layer1[0])
    depths = [len(getattr(net, f"layer{i}")) for i in range(1, 5)]
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(block, width, depths[0])
    for i in range(1, 4):
        setattr(net, f"layer{i + 1}", net._make_layer(block, width * 2**i, depths[i], stride=2))
    net.fc = nn.Linear(8 * width * block.expansion, 1000)
    for m in net.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


class WholeSlideNet(nn.Module):
    """ResNet trunk, global max pooling, a linear head: logits ``(B, num_classes)`` for whole images.

    Parameters
    ----------
    num_classes : int
        Output classes (at least 2).
    arch : str
        One of :data:`ARCHS`.
    width : int
        Base width (channels of the first stage); 64 is torchvision's network,
        less makes a smaller CPU demo or test network (same code path).
    imagenet : bool
        Start from torchvision's ImageNet weights when they are in torch's cache
        (only at ``width=64``); otherwise from a fixed-seed random initialisation.
    trainable_affine : bool
        Whether the frozen BatchNorm layers' affine parameters train.
    fixed_size : bool
        Whether the network was trained on inputs padded (or cropped) to one
        fixed side (the spec's ``input_size``); the slide runner pads so too.

    Attributes
    ----------
    provenance : str
        Where the starting weights came from, in words.
    """

    def __init__(
        self,
        num_classes: int = 2,
        arch: str = "resnet50",
        width: int = 64,
        imagenet: bool = False,
        trainable_affine: bool = True,
        fixed_size: bool = False,
    ) -> None:
        super().__init__()
        self.fixed_size = bool(fixed_size)
        _check_config(num_classes, arch, width)
        rng = torch.random.fork_rng(devices=[])
        with rng:
            torch.manual_seed(0)
            resnet = _resnet(arch, width)
            self.fc = nn.Linear(int(resnet.fc.in_features), num_classes)
        freeze_batch_norm(resnet, trainable_affine)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4,
        )  # fmt: skip
        self.num_features = int(resnet.fc.in_features)
        self.arch, self.width = arch, width
        self.provenance = f"random initialisation (fixed seed), {arch} width {width}"
        if imagenet:
            self.provenance = self.load_imagenet() or self.provenance

    def load_imagenet(self) -> str | None:
        """Load torchvision's ImageNet weights from torch's cache (not the head); a provenance line or None.

        None when the file is not on disk or the network is narrower than torchvision's (nothing is
        downloaded). The frozen BatchNorm layers take the file's running statistics.
        """
        from napari_pathology.features.backbones import cached_weights
        from napari_pathology.features.encoders import EncoderError, load_state_dict

        path = cached_weights(self.arch)
        if self.width != 64 or path is None:
            return None
        state = {k: v for k, v in load_state_dict(path).items() if not k.startswith("fc.")}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise EncoderError(f"{path} does not hold {self.arch} weights ({(unexpected or missing)[0]} ...)")
        return f"ImageNet weights from {Path(path).name}"

    def initialise_from_data(self, x: torch.Tensor) -> None:
        """Start a network trained from scratch well scaled: BatchNorm statistics measured on ``x``.

        Frozen BatchNorm never normalises by batch statistics, so a randomly
        initialised network's activations are far from unit scale; here every
        BatchNorm takes the mean and variance of its input over ``x``
        (``(B, 3, H, W)`` normalised images, layer by layer in one forward),
        and each residual block starts as the identity (Goyal et al.'s zero
        initialisation of its last BatchNorm scale), so training starts from a
        well-scaled network. ImageNet weights need none of this.
        """
        for block in (m for m in self.modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")):
            last = block.bn3 if hasattr(block, "bn3") else block.bn2
            with torch.no_grad():
                last.weight.zero_()

        def measure(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            values = inputs[0].float()
            module.running_mean.copy_(values.mean(dim=(0, 2, 3)))
            module.running_var.copy_(values.var(dim=(0, 2, 3), unbiased=False))

        hooks = [
            m.register_forward_pre_hook(measure) for m in self.modules() if isinstance(m, AffineBatchNorm2d)
        ]
        try:
            with torch.no_grad():
                self.features(x)
        finally:
            for hook in hooks:
                hook.remove()

    def stages(self) -> list[nn.Module]:
        """The trunk as five stages run in order: stem (conv1 to maxpool), layer1 ... layer4."""
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map ``(B, num_features, ceil(H/32), ceil(W/32))``."""
        for stage in self.stages():
            x = stage(x)
        return x

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        """Logits from a feature map: global max pooling then the linear layer (in the head's dtype)."""
        pooled = fmap.amax(dim=(2, 3))
        return self.fc(pooled.to(self.fc.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of whole images ``(B, 3, H, W)`` (any H, W)."""
        return self.head(self.features(x))

    def cam(self, fmap: torch.Tensor, label: int | None = None) -> torch.Tensor:
        """Class activation maps ``(B, h, w)`` of class ``label`` (None: each image's predicted class).

        The feature map weighted by the class's row of the linear layer, plus
        its bias: where the map is high, the features that raise the class's
        logit are high.
        """
        weight = self.fc.weight.to(fmap.dtype)
        bias = self.fc.bias.to(fmap.dtype)
        if label is None:
            labels = self.head(fmap).argmax(dim=1)
        else:
            if not 0 <= int(label) < weight.shape[0]:
                raise ValueError(f"class index {label} is not one of 0..{weight.shape[0] - 1}")
            labels = torch.full((fmap.shape[0],), int(label), device=fmap.device)
        rows = weight[labels]  # (B, C)
        return torch.einsum("bchw,bc->bhw", fmap, rows) + bias[labels].reshape(-1, 1, 1)

    # ------------------------------------------------------------------ the slide runner's protocol
    @property
    def output_stride(self) -> int:
        """Input px per cell of the last feature map (and of the class activation maps): 32."""
        from napari_pathology.families.wholeslide.tiling import geometry

        return geometry(self.stages()).stride

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(rows, cols)`` of the class activation maps of a ``height`` x ``width`` input."""
        from napari_pathology.families.wholeslide.tiling import geometry

        geom = geometry(self.stages())
        return geom.size(0, int(height)), geom.size(1, int(width))

    def inference_tile(self, height: int, width: int, budget: int) -> int:
        """The largest tile side whose tiled prediction fits ``budget`` bytes (ValueError: none fits)."""
        from napari_pathology.families.wholeslide.streaming import choose_inference_tile

        return choose_inference_tile(self, int(height), int(width), int(budget))

    def predict_tiles(
        self,
        image: torch.Tensor,
        tile: int,
        *,
        device: torch.device | str | None = None,
        autocast: torch.dtype | None = None,
        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Generator[tuple[slice, slice, torch.Tensor], None, torch.Tensor]:
        """Every class's activation map tile by tile: yields ``(rows, cols, maps (B, K, h, w))``.

        Returns the logits ``(B, K)``; equal to :meth:`forward` and :meth:`cam`
        of the whole image (see :func:`.streaming.stream_cam_tiles`).
        """
        from napari_pathology.families.wholeslide.streaming import stream_cam_tiles

        return stream_cam_tiles(self, image, tile, device=device, autocast=autocast, prepare=prepare)


def _check_config(num_classes: int, arch: str, width: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer of at least 2, got {num_classes!r}")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= 64:
        raise ValueError(f"width must be an integer from 1 to 64, got {width!r}")


@register_family(FAMILY)
def build_wholeslide(
    num_classes: int = 2,
    arch: str = "resnet50",
    width: int = 64,
    imagenet: bool = False,
    trainable_affine: bool = True,
    fixed_size: bool = False,
) -> WholeSlideNet:
    """Builder of the ``wholeslide`` family (see :class:`WholeSlideNet`)."""
    return WholeSlideNet(num_classes, arch, width, imagenet, trainable_affine, fixed_size)


def wholeslide_spec(
    name: str,
    *,
    classes: tuple[str, ...] = ("normal", "tumour"),
    arch: str = "resnet50",
    width: int = 64,
    input_size: int = INPUT_SIZE,
    mpp: float = INPUT_MPP,
    description: str = "",
    fixed_size: bool = False,
) -> ModelSpec:
    """A whole-slide spec: the slide at ``mpp`` um/px as one image, one prediction.

    With ``fixed_size`` the network was trained on the tissue padded with white
    (or centre-cropped) to ``input_size`` x ``input_size`` px, and the slide
    runner pads it so too; otherwise ``input_size`` is only the nominal side
    and each slide's tissue goes in as it is.
    """
    _check_config(len(tuple(classes)), arch, width)
    return ModelSpec(
        name=name,
        family=FAMILY,
        task="slide classes from the whole slide at low magnification (global max pooling CNN)",
        classes=tuple(classes),
        input_size=input_size,
        mpp=mpp,
        stride=input_size,
        normalization="imagenet",
        output="slide",
        aggregator="max",
        positive_class="tumour" if "tumour" in classes else None,
        description=description
        or (
            f"Chen et al. 2021 whole-slide {arch} (width {width}) with global max pooling and frozen "
            "BatchNorm; untrained - train it on slide labels"
        ),
        config={"arch": arch, "width": width, "fixed_size": bool(fixed_size)},
    )


register_spec(wholeslide_spec("wholeslide-resnet50"))
