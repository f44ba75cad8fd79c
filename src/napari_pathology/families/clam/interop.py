"""Two-way interop with CLAM's own checkpoints (bare state dicts written by its training code).

CLAM's ``main.py`` saves ``torch.save(model.state_dict(), "s_{fold}_checkpoint.pt")``:
weight names only, no architecture. :func:`import_clam_checkpoint` reads
such a file safely (``weights_only=True``: a pickle holding code is
refused), infers the architecture from the weight shapes (SB or MB, gated or
plain attention, L and D and so the size, embedding size, number of
classes) and loads every key layout CLAM's versions have written:

- ``module.`` in front of every name (a model wrapped in ``nn.DataParallel``)
  or after ``attention_net.`` (older code wrapped only the attention network
  on several GPUs);
- ``instance_loss_fn.labels`` (the smooth SVM loss is a sub-module with a
  buffer) and other entries of the loss, ignored;
- the attention block at ``attention_net.3`` (current code: Linear, ReLU,
  Dropout, attention) or ``attention_net.2`` (older code built the FC
  dropout only when dropout was on), and the plain attention's last layer
  at ``module.3`` or ``module.2`` likewise;
- ``classifiers`` as one ``Linear(L, C)`` (SB) or C ``Linear(L, 1)`` (MB), and
  ``instance_classifiers.{i}`` (``Linear(L, 2)``, one per class).

A file that is none of these is refused in one line saying what a CLAM
checkpoint holds and what was found. :func:`export_clam_checkpoint` writes a
model of this family back as a bare state dict in CLAM's current layout,
which CLAM's ``CLAM_SB``/``CLAM_MB`` (built with the same type, gating, size,
dropout on or off, embedding size and classes, and the default instance
loss) load with ``strict=True``. No Qt, no napari.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from napari_pathology.families.clam.model import FAMILY, SIZES, ClamNet, build_clam, clam_spec
from napari_pathology.models.checkpoint import require_torch_file
from napari_pathology.models.registry import (
    ModelError,
    PathologyModel,
    load_untrusted,
    save_torch_file,
)

__all__ = [
    "clam_layout",
    "clam_state_dict",
    "export_clam_checkpoint",
    "import_clam_checkpoint",
    "read_state_dict",
    "recognise_clam_checkpoint",
]

#: What a CLAM checkpoint holds, for messages.
EXPECTED = (
    "a CLAM checkpoint is a bare state dict with attention_net.* (FC layer and attention network), "
    "classifiers.* and instance_classifiers.* weights"
)
_IGNORED_PREFIXES = ("instance_loss_fn.",)
_ATTENTION = re.compile(r"^attention_net\.(\d+)\.(attention_a|attention_b|attention_c|module)\.")


def _few(items: Sequence[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The bare state dict in ``path``, read with ``weights_only=True``; ModelError in one line otherwise."""
    path = Path(path).expanduser()
    where = f"Cannot import CLAM checkpoint {path.name}"
    require_torch_file(path, where, EXPECTED)
    data = load_untrusted(path, where)
    if isinstance(data, torch.Tensor):
        raise ModelError(f"{where}: it holds one tensor {tuple(data.shape)}, not a state dict; {EXPECTED}")
    if not isinstance(data, Mapping):
        raise ModelError(f"{where}: it holds a {type(data).__name__}, not a state dict; {EXPECTED}")
    if data.get("format") == "napari-pathology-checkpoint":
        raise ModelError(
            f"{where}: it is a napari-pathology checkpoint, not CLAM's; open it as a model directly"
        )
    others = [str(k) for k, v in data.items() if not isinstance(v, torch.Tensor)]
    if others or not data:
        found = f"non-tensor entries {_few(others)}" if others else "nothing"
        raise ModelError(f"{where}: it holds {found}; {EXPECTED}")
    return {str(k): v for k, v in data.items()}


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Names without ``module.`` wrappers, and the names ignored (the instance loss's buffers)."""
    out: dict[str, torch.Tensor] = {}
    ignored = []
    for key, value in state.items():
        name = key
        while name.startswith("module."):
            name = name[len("module.") :]
        name = re.sub(r"^(attention_net|classifiers|instance_classifiers)\.module\.", r"\1.", name)
        if name.startswith(_IGNORED_PREFIXES):
            ignored.append(key)
            continue
        if name in out:
            raise ValueError(f"two weights become {name} once 'module.' is removed")
        out[name] = value
    return out, ignored


def clam_layout(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """A CLAM state dict in this family's (CLAM's current) layout, its builder config and class count.

    Raises
    ------
    ValueError
        Saying what does not fit a CLAM model (the caller names the file).

    """
    state, _ignored = _strip_wrappers(state)
    if "attention_net.0.weight" not in state:
        raise ValueError(f"found {_few(sorted(state))} ({len(state)} tensors); {EXPECTED}")
    indices = {int(m.group(1)) for k in state if (m := _ATTENTION.match(k))}
    if len(indices) != 1 or not indices <= {2, 3}:
        raise ValueError(
            f"no attention network at attention_net.2 or attention_net.3 (found {_few(sorted(state))}); "
            f"{EXPECTED}"
        )
    index = indices.pop()
    legacy_fc = index == 2  # older code: no Dropout module in the FC block when dropout was off
    state = {re.sub(r"^attention_net\.2\.", "attention_net.3.", k): v for k, v in state.items()}
    gate = "attention_net.3.attention_a.0.weight" in state
    plain_last = None
    if not gate:
        lasts = {
            int(m.group(1)) for k in state if (m := re.match(r"^attention_net\.3\.module\.(\d+)\.weight$", k))
        }
        plain_last = max(lasts - {0}, default=None)
        if plain_last not in (2, 3):
            raise ValueError("the plain attention network has no output layer at module.2 or module.3")
        state = {
            re.sub(r"^attention_net\.3\.module\.2\.", "attention_net.3.module.3.", k): v
            for k, v in state.items()
        }
    fc = state["attention_net.0.weight"]
    first = state["attention_net.3.attention_a.0.weight" if gate else "attention_net.3.module.0.weight"]
    last = state["attention_net.3.attention_c.weight" if gate else "attention_net.3.module.3.weight"]
    if fc.ndim != 2 or first.ndim != 2 or last.ndim != 2:
        raise ValueError("the FC and attention weights are not matrices")
    hidden, embed_dim = fc.shape
    attention_dim, branches = first.shape[0], last.shape[0]
    if "classifiers.weight" in state:
        model_type, n_classes = "sb", int(state["classifiers.weight"].shape[0])
    else:
        heads = {int(m.group(1)) for k in state if (m := re.match(r"^classifiers\.(\d+)\.weight$", k))}
        if not heads:
            raise ValueError(f"no bag classifier (classifiers.weight or classifiers.0.weight); {EXPECTED}")
        model_type, n_classes = "mb", len(heads)
    if model_type == "mb" and branches != n_classes:
        raise ValueError(f"CLAM-MB with {n_classes} classifiers but {branches} attention branches")
    if model_type == "sb" and branches != 1:
        raise ValueError(f"CLAM-SB with {branches} attention branches (expected 1)")
    if n_classes < 2:
        raise ValueError(f"{n_classes} class; CLAM models have at least 2")
    size = next((name for name, dims in SIZES.items() if dims == (hidden, attention_dim)), None)
    config: dict[str, Any] = dict(
        model_type=model_type, gate=gate, size=size or "small", embed_dim=int(embed_dim),
        dropout=0.0 if legacy_fc or plain_last == 2 else 0.25,
    )  # fmt: skip
    if size is None:
        config.update(hidden=int(hidden), attention_dim=int(attention_dim))
    expected = ClamNet(n_classes, **config).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if shapes:
        problems.append(f"shapes {_few(shapes)}")
    if problems:
        kind = f"CLAM-{model_type.upper()} with {n_classes} classes"
        raise ValueError(f"its weights do not make one {kind}: {'; '.join(problems)}")
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise ValueError(f"its weights hold NaN or infinite values ({_few(broken)})")
    return {k: state[k] for k in expected}, config, n_classes


def _class_names(classes: str | Sequence[str] | None, n_classes: int) -> tuple[str, ...]:
    if classes is None:
        return tuple(f"class {k}" for k in range(n_classes))
    names = tuple(n.strip() for n in (classes.split(",") if isinstance(classes, str) else map(str, classes)))
    if len(names) != n_classes or not all(names) or len(set(names)) != len(names):
        raise ValueError(
            f"the checkpoint has {n_classes} classes; give {n_classes} distinct class names "
            f"(--classes), not {list(names)}"
        )
    return names


def import_clam_checkpoint(
    path: str | os.PathLike[str],
    classes: str | Sequence[str] | None = None,
    name: str | None = None,
) -> PathologyModel:
    """A model of this family from a checkpoint written by CLAM's training code, in eval mode.

    Parameters
    ----------
    path : path-like
        CLAM's ``s_{fold}_checkpoint.pt`` (a bare state dict).
    classes : str or sequence of str, optional
        Class names in logit order (``"LUAD,LUSC"``); default ``class 0``, ``class 1``...
    name : str, optional
        The model's name (default: the file's stem).

    Raises
    ------
    ModelError
        One line naming the file: not a PyTorch file, a pickle holding code,
        not a state dict, weights that are not CLAM's (what was expected and
        found), or class names that do not fit.

    """
    from napari_pathology.training.common import model_name_for

    path = Path(path).expanduser()
    state = read_state_dict(path)
    try:
        weights, config, n_classes = clam_layout(state)
        names = _class_names(classes, n_classes)
    except ValueError as error:
        raise ModelError(f"Cannot import CLAM checkpoint {path.name}: {error}") from None
    spec = clam_spec(
        name or model_name_for(path), classes=names, k_sample=8, instance_loss="svm",
        description=f"imported from CLAM checkpoint {path.name}", **config,
    )  # fmt: skip
    model = PathologyModel(build_clam(n_classes, **spec.config), spec)
    model.net.load_state_dict(weights, strict=True)
    model.net.init = f"CLAM checkpoint {path.name}"
    model.source = str(path)
    model.provenance = {"imported_from": str(path), "format": "CLAM state dict"}
    return model.eval()


def recognise_clam_checkpoint(
    path: str | os.PathLike[str], classes: str | Sequence[str] | None = None
) -> PathologyModel | None:
    """The model in ``path`` when its weights are CLAM's (see :func:`import_clam_checkpoint`), else None.

    A file that holds no state dict, or one without CLAM's attention network,
    is not CLAM's (None: another family may know it); a file with CLAM's
    weight names that cannot be imported raises :class:`ModelError`.
    """
    try:
        state, _ignored = _strip_wrappers(read_state_dict(path))
    except (ModelError, ValueError):
        return None
    if "attention_net.0.weight" not in state:
        return None
    return import_clam_checkpoint(path, classes)


def clam_state_dict(model: PathologyModel | ClamNet) -> dict[str, torch.Tensor]:
    """The weights of a model of this family under CLAM's current names (CPU copies).

    With dropout off, plain attention's output layer is ``module.2`` as CLAM
    builds it then; everything else keeps its name.
    """
    net = model.net if isinstance(model, PathologyModel) else model
    if not isinstance(net, ClamNet):
        family = getattr(getattr(model, "spec", None), "family", type(net).__name__)
        raise ModelError(f"only {FAMILY!r} models can be exported to CLAM, got {family!r}")
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    if not net.gate and net.dropout == 0:
        state = {
            k.replace("attention_net.3.module.3.", "attention_net.3.module.2."): v for k, v in state.items()
        }
    return state


def export_clam_checkpoint(model: PathologyModel | ClamNet, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` as CLAM's training code would (a bare state dict), atomically; returns the path.

    CLAM loads it with ``model.load_state_dict(torch.load(path), strict=True)``
    into ``CLAM_SB``/``CLAM_MB`` built with the same settings (see
    :func:`clam_state_dict`).
    """
    return save_torch_file(clam_state_dict(model), path)
