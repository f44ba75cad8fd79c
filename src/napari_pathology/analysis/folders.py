"""Where results go and whose they are: one folder per slide and model, never another slide's.

A result folder is ``OUT/<slide stem>/<model name>`` (:func:`result_folder`);
its ``result.json`` records the slide it belongs to, and :func:`check_owner`
refuses to replace the result of another slide. :func:`recover_result_folder`
repairs what a kill in the middle of replacing a folder left behind. No Qt.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from napari_pathology.fileio import read_json_file, safe_name

__all__ = [
    "ResultOwnerError",
    "check_owner",
    "folder_owner",
    "path_tag",
    "real_path",
    "recover_result_folder",
    "result_folder",
    "same_slide_path",
]


class ResultOwnerError(ValueError):
    """The result folder holds the result of another slide; it is not replaced."""


def real_path(path: str | os.PathLike[str]) -> str:
    """The resolved absolute path (``~`` expanded, links followed)."""
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def same_slide_path(a: str | os.PathLike[str] | None, b: str | os.PathLike[str] | None) -> bool:
    """Whether two recorded slide paths name the same file (None matches only None)."""
    if a is None or b is None:
        return a is None and b is None
    if real_path(a) == real_path(b):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


_UNREADABLE = object()


def _recorded_slide(meta_path: Path) -> Any:
    """The slide path a ``result.json`` records, or ``_UNREADABLE``."""
    try:
        meta = read_json_file(meta_path, "result file")
    except (OSError, ValueError):
        return _UNREADABLE
    if not isinstance(meta, dict):
        return _UNREADABLE
    return meta.get("slide_realpath") or meta.get("slide_path")


def folder_owner(folder: str | os.PathLike[str], slide_path: str | None) -> bool | None:
    """Whether the results in ``folder`` (``result.json`` in it or its sub-folders) belong to ``slide_path``.

    Returns
    -------
    bool or None
        None when the folder holds no result (free), True when every result
        in it records ``slide_path``, False when one records another slide or
        cannot be read (never assumed to be ours).
    """
    folder = Path(folder)
    if not folder.exists():
        return None
    if not folder.is_dir():
        return False
    metas = [folder / "result.json"] if (folder / "result.json").exists() else []
    with contextlib.suppress(OSError):
        metas += sorted(
            p / "result.json" for p in folder.iterdir() if p.is_dir() and (p / "result.json").exists()
        )
    if not metas:
        return None
    for meta in metas:
        recorded = _recorded_slide(meta)
        if recorded is _UNREADABLE or not same_slide_path(recorded, slide_path):
            return False
    return True


def check_owner(out_dir: str | os.PathLike[str], slide_path: str | None) -> None:
    """Refuse a result folder whose ``result.json`` records another slide.

    Raises
    ------
    ResultOwnerError
        Naming the folder and the slide it belongs to.
    """
    meta_path = Path(out_dir) / "result.json"
    if not meta_path.exists():
        return
    recorded = _recorded_slide(meta_path)
    if recorded is not _UNREADABLE and not same_slide_path(recorded, slide_path):
        raise ResultOwnerError(
            f"{out_dir} holds the result of another slide ({recorded}); not replaced. "
            "Choose another output folder or remove that result."
        )


def path_tag(path: str | os.PathLike[str]) -> str:
    """Eight hex digits of the SHA-256 of a slide's resolved path (tells same-named slides apart)."""
    return hashlib.sha256(os.path.realpath(os.fspath(path)).encode()).hexdigest()[:8]


def result_folder(out_dir: str | os.PathLike[str], slide: Any, model_name: str) -> Path:
    """The folder for one slide and one model: ``OUT/<slide stem>/<model name>``, unique per slide.

    ``OUT/<stem>`` is used while it is free or holds only results of this
    slide (the path each ``result.json`` records); a slide with the same file
    name from another folder gets ``OUT/<stem>-<8 hex digits of its resolved
    path>`` instead, so it never writes into another slide's results. Both
    names are sanitised (:func:`napari_pathology.fileio.safe_name`): a model
    named ``..`` or ``a/b`` stays inside ``OUT/<stem>``.
    """
    out_dir = Path(out_dir)
    stem = safe_name(Path(slide.name).stem, fallback="slide")
    model = safe_name(model_name, fallback="model")
    if not slide.path:
        return out_dir / stem / model
    tagged = out_dir / f"{stem}-{path_tag(slide.path)}"
    if folder_owner(tagged, slide.path) is True:
        return tagged / model
    if folder_owner(out_dir / stem, slide.path) is not False:
        return out_dir / stem / model
    return tagged / model


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def recover_result_folder(out_dir: str | os.PathLike[str]) -> None:
    """Repair what a kill in the middle of replacing a result folder left behind.

    A process killed between the two renames of a folder replacement leaves
    the previous result in a hidden ``.<name>.<pid>.<id>.old`` sibling: it is
    moved back when ``out_dir`` is missing. Temporaries of dead processes are
    removed.
    """
    out_dir = Path(out_dir)
    parent = out_dir.parent
    if not parent.is_dir():
        return
    leftovers = []
    for sibling in parent.glob(f".{out_dir.name}.*"):
        parts = sibling.name[len(out_dir.name) + 2 :].split(".")
        if len(parts) == 3 and parts[0].isdigit() and len(parts[1]) == 8 and parts[2] in ("old", "tmp"):
            if not _pid_alive(int(parts[0])):
                leftovers.append(sibling)
    olds = sorted(
        (p for p in leftovers if p.name.endswith(".old") and (p / "result.json").exists()),
        key=lambda p: p.stat().st_mtime_ns,
    )
    if not out_dir.exists() and olds:
        with contextlib.suppress(OSError):
            os.replace(olds[-1], out_dir)
    for sibling in leftovers:
        if sibling.exists():
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    sibling.unlink()
