"""Checkpoints: weight digests, hostile pickles, umask permissions and full disks (CPU, no Qt)."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from napari_pathology.fileio import OutputError
from napari_pathology.models import (
    ModelError,
    checkpoint_info,
    create_model,
    load_checkpoint,
    save_checkpoint,
)
from napari_pathology.models.registry import load_untrusted, refused_as_code

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "napari_pathology" / "models" / "weights"


class Hostile:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return (os.system, ("touch hostile-pickle-ran",))


class HostileEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def flip_byte_in_largest_tensor(path: Path, out: Path) -> Path:
    """A copy of a torch.save zip with one byte flipped inside its largest tensor's storage."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    start = info.header_offset
    name_len = int.from_bytes(raw[start + 26 : start + 28], "little")
    extra_len = int.from_bytes(raw[start + 28 : start + 30], "little")
    raw[start + 30 + name_len + extra_len + info.file_size // 2] ^= 0x40
    out.write_bytes(raw)
    return out


def test_a_flipped_byte_in_the_weights_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(create_model("metastasis-small-10x"), tmp_path / "met.pt")
    bad = flip_byte_in_largest_tensor(path, tmp_path / "flipped.pt")
    assert torch.load(bad, weights_only=True)["format"]  # torch itself reads it without complaint
    message = r"checkpoint .*flipped\.pt is damaged: its weights do not match the digest saved with them"
    with pytest.raises(ModelError, match=message):
        load_checkpoint(bad)
    with pytest.raises(ModelError, match=message):
        checkpoint_info(bad)
    assert load_checkpoint(path).spec.family == "metastasis"  # the intact one loads


def test_checkpoints_without_a_digest_still_load(tmp_path: Path) -> None:
    path = save_checkpoint(create_model("nuclear-density"), tmp_path / "old.pt")
    data = torch.load(path, weights_only=True)
    del data["weights_sha256"]
    torch.save(data, path)
    assert load_checkpoint(path).spec.name == "nuclear-density"


def test_shipped_weights_load_and_stay_byte_identical() -> None:
    files = sorted(WEIGHTS.glob("*.pt"))
    assert files
    before = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    for f in files:
        load_checkpoint(f)
        checkpoint_info(f)
    assert {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files} == before


def _zip_with_pickle(good: Path, out: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, payload if info.filename.endswith("data.pkl") else data)
    return out


def test_hostile_pickles_are_code_never_corrupt(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.pt"
    torch.save({"x": torch.zeros(3)}, good)
    import numpy as np

    files = {
        "blocked_module.pt": lambda p: torch.save({"a": Hostile()}, p),  # "unsupported GLOBAL ... is blocked"
        "builtin_eval.pt": lambda p: torch.save({"a": HostileEval()}, p),  # "Unsupported global: GLOBAL eval"
        "numpy.pt": lambda p: torch.save({"a": np.zeros(2)}, p),
        "raw_protocol2.pt": lambda p: p.write_bytes(pickle.dumps({"a": Hostile()}, protocol=2)),
        "zip_stack_global.pt": lambda p: _zip_with_pickle(
            good, p, pickle.dumps({"a": Hostile()}, protocol=4)
        ),
    }
    for name, write in files.items():
        write(tmp_path / name)
        with pytest.raises(
            ModelError, match=rf"{name}: it holds code \(pickled objects\) that napari-pathology"
        ):
            load_checkpoint(tmp_path / name)
    assert not (tmp_path / "hostile-pickle-ran").exists()

    torn = tmp_path / "torn.pt"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02" + bytes(range(40, 90)))
    for path in (torn, garbage):
        with pytest.raises(ModelError, match="corrupt or truncated") as caught:
            load_untrusted(path, path.name)
        assert "code" not in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "message",
    [
        "Weights only load failed. ... WeightsUnpickler error: Unsupported global: GLOBAL os.system was not "
        "an allowed global by default",
        "Trying to load unsupported GLOBAL posix.system whose module posix is blocked.",
        "Weights only load failed. Unsupported GLOBAL builtins.exec (weights_only)",
        "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely "
        "succeed, but it can result in arbitrary code execution.\nUnsupported class numpy.core.multiarray",
        "Weights only load failed. Trying to call reduce for unrecognized function <built-in function eval>",
    ],
)
def test_every_wording_of_a_refused_global_is_code(message: str) -> None:
    assert refused_as_code(pickle.UnpicklingError(message))


def test_torn_file_wordings_are_not_code() -> None:
    for message in (
        "PytorchStreamReader failed reading zip archive: failed finding central directory",
        "Weights only load failed. ... WeightsUnpickler error: Unsupported operand 44",
        "Ran out of input",
    ):
        assert not refused_as_code(RuntimeError(message))


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoints_respect_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        path = save_checkpoint(create_model("nuclear-density"), tmp_path / "sub" / "m.pt")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_folder(tmp_path: Path, monkeypatch) -> None:
    import napari_pathology.fileio as fileio

    path = save_checkpoint(create_model("nuclear-density"), tmp_path / "m.pt")
    before = path.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(OutputError) as caught:
        save_checkpoint(create_model("metastasis-small-10x"), path)
    monkeypatch.undo()
    assert str(caught.value) == f"cannot write to {tmp_path}: the disk is full"
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_fifo_named_like_a_checkpoint_is_refused_without_blocking(tmp_path: Path) -> None:
    import threading

    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    errors: list[str] = []

    def load() -> None:
        try:
            load_checkpoint(fifo)
        except ModelError as error:
            errors.append(str(error))

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "loading a FIFO blocked"
    assert errors and "not a regular file" in errors[0]


def test_a_spec_named_dot_dot_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(create_model("nuclear-density"), tmp_path / "m.pt")
    data = torch.load(path, weights_only=True)
    data["spec"]["name"] = ".."
    del data["weights_sha256"]
    torch.save(data, path)
    with pytest.raises(ModelError, match=r"invalid model spec.*not a usable name"):
        load_checkpoint(path)


def test_non_finite_weights_are_refused_naming_them(tmp_path: Path) -> None:
    model = create_model("nuclear-density")
    with torch.no_grad():
        model.net.head.weight.fill_(float("nan"))
    path = save_checkpoint(model, tmp_path / "diverged.pt")
    with pytest.raises(
        ModelError, match=r"diverged\.pt: its weights hold NaN or infinite values \(net\.head\.weight"
    ):
        load_checkpoint(path)
