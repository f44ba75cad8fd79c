"""``clam``: Lu et al. 2021's clustering-constrained attention MIL (CLAM-SB and CLAM-MB).

A slide is a *bag* of patch feature vectors ``(N, embed_dim)`` (1024-d
from a truncated ResNet-50 by default). A fully connected layer (``embed_dim
-> L``, ReLU, dropout) maps each patch to ``h_k``; an attention network
(gated: ``tanh(V h) * sigmoid(U h)`` then a linear layer; plain: ``tanh(V h)``
then a linear layer; hidden size ``D``) scores each patch, one score per
patch for CLAM-SB, one per class for CLAM-MB. The softmax of the raw
scores over the patches weighs the ``h_k`` into the slide representation;
CLAM-SB classifies it with one linear layer, CLAM-MB each class's
representation with that class's own ``Linear(L, 1)``. Sizes: ``small``
(L = 512, D = 256) and ``big`` (512, 384).

Instance-level clustering (training only): for the slide's class, the
``k_sample`` (B = 8) most attended patches are pseudo-labelled positive and
the B least attended negative for that class's instance classifier
(``Linear(L, 2)``); for mutually exclusive subtypes, the B most attended
patches of every other class's branch are negatives of that class's
classifier. A bag of fewer than 2B patches uses ``N // 2`` of each (so no
patch is both), a bag of one patch has no instance loss (CLAM's own code
fails on such bags). The instance loss is the smooth top-1 SVM (see
:mod:`.losses`) or cross-entropy.

The module tree, and so every weight name, is that of CLAM's current code
(``attention_net.0`` the FC layer, ``attention_net.3`` the attention block,
``classifiers``, ``instance_classifiers``), so a state dict moves between
the two (see :mod:`.interop`). No Qt, no napari.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from napari_pathology.families.clam.losses import INSTANCE_LOSSES, instance_loss_fn
from napari_pathology.models.registry import ModelSpec, register_family, register_spec

__all__ = [
    "FAMILY",
    "MODEL_TYPES",
    "SIZES",
    "ClamNet",
    "ClamOutput",
    "build_clam",
    "clam_spec",
]

FAMILY = "clam"
#: CLAM-SB (one attention branch) and CLAM-MB (one branch per class).
MODEL_TYPES = ("sb", "mb")
#: Network sizes: name -> (L, D), the FC width and the attention network's hidden width.
SIZES = {"small": (512, 256), "big": (512, 384)}
#: Patch side (px) and um/px of CLAM's default features (256 px patches at 20x).
PATCH_SIZE, PATCH_MPP = 256, 0.5
#: The feature encoder of CLAM's own pipeline (:mod:`napari_pathology.features`).
DEFAULT_ENCODER = "resnet50-trunc"


@dataclass
class ClamOutput:
    """What CLAM computes for one bag.

    Attributes
    ----------
    logits : Tensor
        ``(1, C)`` class logits.
    probabilities : Tensor
        ``(1, C)`` softmax of the logits.
    attention : Tensor
        ``(K, N)`` raw attention scores before the softmax over patches
        (CLAM's ``A_raw``; K = 1 for CLAM-SB, C for CLAM-MB).
    instance_losses : Tensor or None
        ``(C,)``: the instance loss the bag would have if its label were each
        class (computed when asked); :meth:`instance_loss` picks one.
    """

    logits: torch.Tensor
    probabilities: torch.Tensor
    attention: torch.Tensor
    instance_losses: torch.Tensor | None = None

    def instance_loss(self, label: int | torch.Tensor) -> torch.Tensor:
        """The instance loss for the bag's true ``label`` (as CLAM's ``instance_loss``)."""
        if self.instance_losses is None:
            raise ValueError("the instance losses were not computed (run with instance_eval=True)")
        return self.instance_losses[torch.as_tensor(label, device=self.instance_losses.device).long()].mean()

    def class_attention(self, label: int) -> torch.Tensor:
        """``(N,)`` raw attention of class ``label``'s branch (the only branch of CLAM-SB)."""
        return self.attention[label if self.attention.shape[0] > 1 else 0]


class GatedAttention(nn.Module):
    """Gated attention ``W (tanh(V h) * sigmoid(U h))`` with CLAM's weight names (``attention_a/b/c``)."""

    def __init__(self, hidden: int, attention_dim: int, branches: int, dropout: float) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(hidden, attention_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(hidden, attention_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(attention_dim, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h))


class PlainAttention(nn.Module):
    """Attention ``W tanh(V h)`` with CLAM's weight names (``module.0``, ``module.3``)."""

    def __init__(self, hidden: int, attention_dim: int, branches: int, dropout: float) -> None:
        super().__init__()
        self.module = nn.Sequential(
            nn.Linear(hidden, attention_dim),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(attention_dim, branches),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.module(h)


class ClamNet(nn.Module):
    """CLAM-SB or CLAM-MB on bags of patch features.

    Parameters
    ----------
    num_classes : int
        Slide classes C (at least 2).
    model_type : {"sb", "mb"}
        One attention branch, or one per class.
    gate : bool
        Gated attention (the paper's) or plain.
    size : {"small", "big"}
        L, D = 512, 256 or 512, 384; ``hidden`` and ``attention_dim`` override them.
    embed_dim : int
        Input feature size (1024 for CLAM's truncated ResNet-50).
    dropout : float
        Dropout after the FC layer and in the attention network (0.25).
    k_sample : int
        B, the patches per pseudo-label in instance clustering (8).
    subtyping : bool
        Mutually exclusive classes: the other classes' branches give negatives too.
    instance_loss : {"svm", "ce"}
        Smooth top-1 SVM (the paper's) or cross-entropy.
    hidden, attention_dim : int, optional
        L and D when not those of ``size``.

    Examples
    --------
    >>> net = ClamNet(3, "mb", embed_dim=16).eval()
    >>> out = net.run(torch.randn(10, 16))
    >>> tuple(out.logits.shape), tuple(out.attention.shape)
    ((1, 3), (3, 10))

    """

    def __init__(
        self,
        num_classes: int = 2,
        model_type: str = "sb",
        gate: bool = True,
        size: str = "small",
        embed_dim: int = 1024,
        dropout: float = 0.25,
        k_sample: int = 8,
        subtyping: bool = False,
        instance_loss: str = "svm",
        hidden: int | None = None,
        attention_dim: int | None = None,
    ) -> None:
        super().__init__()
        _check_config(
            num_classes, model_type, gate, size, embed_dim, dropout, k_sample, subtyping, instance_loss
        )
        default_hidden, default_attention = SIZES[size]
        hidden = _positive(hidden, "hidden") if hidden is not None else default_hidden
        attention_dim = (
            _positive(attention_dim, "attention_dim") if attention_dim is not None else default_attention
        )
        branches = num_classes if model_type == "mb" else 1
        attention = (GatedAttention if gate else PlainAttention)(hidden, attention_dim, branches, dropout)
        self.attention_net = nn.Sequential(
            nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Dropout(dropout), attention
        )
        if model_type == "mb":
            self.classifiers: nn.Module = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(num_classes))
        else:
            self.classifiers = nn.Linear(hidden, num_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(num_classes))
        self.n_classes, self.model_type, self.gate = int(num_classes), model_type, bool(gate)
        self.embed_dim, self.hidden, self.attention_dim = int(embed_dim), hidden, attention_dim
        self.dropout, self.k_sample, self.subtyping = float(dropout), int(k_sample), bool(subtyping)
        self.instance_loss_name = instance_loss
        self._instance_loss = instance_loss_fn(instance_loss)
        self.init = "random initialisation"

    # ------------------------------------------------------------------ forward
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(1, C)`` of a bag ``(N, embed_dim)`` (or ``(1, N, embed_dim)``); see :meth:`run`."""
        return self.run(features).logits

    def run(self, features: torch.Tensor, instance_eval: bool = False) -> ClamOutput:
        """Logits, probabilities and raw attention of a bag, and the instance losses when asked.

        Parameters
        ----------
        features : Tensor
            ``(N, embed_dim)`` patch features (a leading batch axis of 1 is dropped).
        instance_eval : bool
            Also compute the instance-clustering loss under each possible label.

        Raises
        ------
        ValueError
            For a bag of another shape or feature size, or an empty bag.

        """
        h = self._embed(self._bag(features))  # (N, L)
        raw = self.attention_net[3](h).transpose(0, 1)  # (K, N)
        weights = F.softmax(raw, dim=1)
        slide = weights @ h  # (K, L)
        if self.model_type == "mb":
            w = torch.cat([c.weight for c in self.classifiers], dim=0)  # (C, L)
            b = torch.cat([c.bias for c in self.classifiers], dim=0)
            logits = ((slide * w).sum(dim=1) + b)[None, :]
        else:
            logits = self.classifiers(slide)
        losses = self.instance_losses(weights, h) if instance_eval else None
        return ClamOutput(logits, F.softmax(logits, dim=1), raw, losses)

    def attention_scores(self, features: torch.Tensor) -> torch.Tensor:
        """``(K, N)`` raw attention of patches ``(N, embed_dim)``, before the softmax over the bag.

        Each patch's score depends on that patch alone, so scores of a slide's
        patches can be computed batch by batch as their features arrive (the
        live attention map); :meth:`run` gives the same values for the whole bag.
        """
        return self.attention_net[3](self._embed(self._bag(features))).transpose(0, 1)

    def _embed(self, h: torch.Tensor) -> torch.Tensor:
        """The FC layer (Linear, ReLU, Dropout) before attention: ``(N, L)``."""
        return self.attention_net[2](self.attention_net[1](self.attention_net[0](h)))

    def _bag(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 3 and features.shape[0] == 1:
            features = features[0]
        if features.ndim != 2 or features.shape[1] != self.embed_dim:
            raise ValueError(
                f"a CLAM bag must be (patches, {self.embed_dim}) features, got shape {tuple(features.shape)}"
                + (" (features from another encoder?)" if features.ndim == 2 else "")
            )
        if features.shape[0] == 0:
            raise ValueError("the bag holds no patches")
        return features

    # ------------------------------------------------------------------ instance clustering
    def instance_losses(self, attention: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``(C,)`` instance-clustering loss of the bag if its label were each class.

        ``attention`` is the ``(K, N)`` softmax attention, ``h`` the ``(N, L)``
        patch embeddings. For label ``c``: the in-class loss of branch ``c``
        (top B positive, bottom B negative), plus, when ``subtyping``, the
        out-of-class losses of every other branch (its top B negative),
        averaged over the C classifiers as CLAM does.
        """
        n = h.shape[0]
        k_in, k_out = min(self.k_sample, n // 2), min(self.k_sample, n)
        zero = h.sum() * 0.0
        in_class, out_class = [], []
        for c, classifier in enumerate(self.instance_classifiers):
            scores = attention[c if attention.shape[0] > 1 else 0]
            if k_in > 0:
                top = torch.topk(scores, k_in).indices
                bottom = torch.topk(-scores, k_in).indices
                targets = torch.cat([torch.ones(k_in), torch.zeros(k_in)]).long().to(h.device)
                in_class.append(self._instance_loss(classifier(h[torch.cat([top, bottom])]), targets))
            else:
                in_class.append(zero)
            if self.subtyping:
                top = torch.topk(scores, k_out).indices
                targets = torch.zeros(k_out, dtype=torch.long, device=h.device)
                out_class.append(self._instance_loss(classifier(h[top]), targets))
        inside = torch.stack(in_class)
        if not self.subtyping:
            return inside
        outside = torch.stack(out_class)
        return (inside + outside.sum() - outside) / self.n_classes

    def extra_repr(self) -> str:
        """Type, gating, sizes and classes, for ``print(net)``."""
        kind = f"CLAM-{self.model_type.upper()}, {'gated' if self.gate else 'plain'} attention"
        sizes = f"{self.embed_dim} -> {self.hidden} (attention {self.attention_dim})"
        return f"{kind}, {sizes}, {self.n_classes} classes"


def _positive(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 1:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    return int(value)


def _check_config(
    num_classes: int, model_type: str, gate: bool, size: str, embed_dim: int,
    dropout: float, k_sample: int, subtyping: bool, instance_loss: str,
) -> None:  # fmt: skip
    if _positive(num_classes, "num_classes") < 2:
        raise ValueError(f"CLAM needs at least 2 classes, got {num_classes}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be 'sb' or 'mb', got {model_type!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    for name, value in (("gate", gate), ("subtyping", subtyping)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    _positive(embed_dim, "embed_dim")
    _positive(k_sample, "k_sample")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if instance_loss not in INSTANCE_LOSSES:
        raise ValueError(f"instance_loss must be one of {', '.join(INSTANCE_LOSSES)}, got {instance_loss!r}")


@register_family(FAMILY)
def build_clam(
    num_classes: int = 2,
    model_type: str = "sb",
    gate: bool = True,
    size: str = "small",
    embed_dim: int = 1024,
    dropout: float = 0.25,
    k_sample: int = 8,
    subtyping: bool = False,
    instance_loss: str = "svm",
    hidden: int | None = None,
    attention_dim: int | None = None,
    encoder: str = DEFAULT_ENCODER,
    encoder_weights: str | None = None,
) -> ClamNet:
    """Builder of the ``clam`` family (see :class:`ClamNet`).

    ``encoder`` and ``encoder_weights`` are not part of the network: they name
    the feature encoder (:mod:`napari_pathology.features`) whose patch
    features the network takes, recorded in the spec so that Run extracts
    the same features it was trained on.
    """
    return ClamNet(
        num_classes, model_type, gate, size, embed_dim, dropout, k_sample, subtyping, instance_loss,
        hidden, attention_dim,
    )  # fmt: skip


def clam_spec(
    name: str,
    *,
    model_type: str = "sb",
    classes: tuple[str, ...] = ("normal", "tumour"),
    gate: bool = True,
    size: str = "small",
    embed_dim: int = 1024,
    dropout: float = 0.25,
    k_sample: int = 8,
    subtyping: bool | None = None,
    instance_loss: str = "svm",
    hidden: int | None = None,
    attention_dim: int | None = None,
    encoder: str = DEFAULT_ENCODER,
    encoder_weights: str | None = None,
    input_size: int = PATCH_SIZE,
    mpp: float = PATCH_MPP,
    normalization: str = "imagenet",
    description: str = "",
) -> ModelSpec:
    """A CLAM spec: bags of patch features, attention pooling to one slide prediction.

    The features are those of ``encoder`` (default CLAM's ResNet-50 truncated
    after layer 3: 1024-d, 256 px patches at 0.5 um/px); ``input_size``,
    ``mpp`` and ``normalization`` are the encoder's patches. ``subtyping``
    (None) is True unless the classes are exactly a normal and one other class.
    """
    classes = tuple(classes)
    if subtyping is None:
        subtyping = not (len(classes) == 2 and "normal" in classes)
    config = dict(
        model_type=model_type, gate=gate, size=size, embed_dim=embed_dim, dropout=dropout,
        k_sample=k_sample, subtyping=subtyping, instance_loss=instance_loss,
    )  # fmt: skip
    if hidden is not None:
        config["hidden"] = hidden
    if attention_dim is not None:
        config["attention_dim"] = attention_dim
    config["encoder"] = str(encoder)
    if encoder_weights is not None:
        config["encoder_weights"] = str(encoder_weights)
    kind = f"CLAM-{model_type.upper()}"
    return ModelSpec(
        name=name,
        family=FAMILY,
        task=f"slide classification from attention-pooled patch features ({kind})",
        classes=classes,
        input_size=int(input_size),
        mpp=float(mpp),
        stride=int(input_size),
        normalization=normalization,
        output="slide",
        aggregator="attention",
        positive_class="tumour" if "tumour" in classes else None,
        description=description
        or (
            f"Lu et al. 2021 {kind}, {'gated' if gate else 'plain'} attention, {size} ({embed_dim}-d patch "
            "features); untrained - train it on slide labels or import a CLAM checkpoint"
        ),
        config=config,
    )


register_spec(clam_spec("clam-sb"))
register_spec(clam_spec("clam-mb", model_type="mb", classes=("normal", "tumour_a", "tumour_b")))
