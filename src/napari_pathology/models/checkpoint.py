"""Checkpoint files: the container format, weights digests and safe reading.

Checkpoints are single files holding the spec, the weights, a SHA-256
digest of the weights (:func:`tensors_digest`) and free-form provenance and
metrics; they are written atomically (:func:`napari_pathology.fileio.atomic_write`)
and read with ``torch.load(weights_only=True)``, because a checkpoint is
untrusted input: a file holding pickled code is refused as such
(:func:`load_untrusted`), weights that no longer match their digest (a
flipped byte) are refused as damaged, and weights holding NaN or infinite
values are refused. Checkpoints written before the digest existed still load.

This module reads and writes files only; building the model a checkpoint
describes is :func:`napari_pathology.models.factory.load_checkpoint`.

No Qt, no napari.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickletools
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from napari_pathology.fileio import atomic_write, require_regular_file
from napari_pathology.models.spec import ModelError, ModelSpec, _plain

if TYPE_CHECKING:
    from napari_pathology.models.factory import PathologyModel

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_SUFFIXES",
    "CHECKPOINT_VERSION",
    "ForeignCheckpointError",
    "checkpoint_info",
    "load_untrusted",
    "read_checkpoint",
    "refused_as_code",
    "require_torch_file",
    "save_checkpoint",
    "save_torch_file",
    "tensors_digest",
]

CHECKPOINT_FORMAT = "napari-pathology-checkpoint"
CHECKPOINT_VERSION = 1
#: File endings treated as checkpoint paths by :func:`resolve_model`.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


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


class ForeignCheckpointError(ModelError):
    """A readable PyTorch file that is not a napari-pathology checkpoint (another tool's, bare weights)."""


def require_torch_file(path: Path, where: str, expected: str = "expected a file from torch.save") -> None:
    """Refuse, in one line starting with ``where``, a path that is not a file ``torch.save`` wrote.

    Missing files, folders, FIFOs and devices (never opened: a read would
    block), and files whose first bytes are neither a zip (``torch.save``) nor
    a pickle (what was found is named: empty, JSON, text, other data).
    """
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
        raise ModelError(f"{where}: not a PyTorch checkpoint file ({kind}); {expected}")


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], ModelSpec]:
    """Load and check the container; return the path, the raw dict and the validated spec."""
    path = Path(path).expanduser()
    where = f"Cannot load model checkpoint {path.name}"
    require_torch_file(path, where)
    data = load_untrusted(path, where)
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
            reason = (
                f"it is a bare state_dict ({len(data)} tensors) without a model spec; "
                "save it with napari_pathology.models.save_checkpoint"
            )
        else:
            reason = f"it is a PyTorch file but not a {CHECKPOINT_FORMAT} (no 'format' entry)"
        raise ForeignCheckpointError(f"{where}: {reason}")
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
    path, data, spec = read_checkpoint(path)
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
