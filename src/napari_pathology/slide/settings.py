"""Per-slide settings the user chose, kept beside the slide (no Qt, no napari).

Today one setting: the um/px the user set for a slide whose file lacks it (or
states it wrongly). Annotations saved afterwards are in that um/px's
micrometres, so the slide must open with it again: :func:`open_slide` applies
a remembered value unless told not to. The file is
``<slide file>.napari-pathology.json`` beside the slide, or, when the slide's
folder is read-only, a file in :func:`user_data_folder` ``/ "slides"`` whose
name carries a digest of the slide's full path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from napari_pathology.fileio import OutputError, atomic_write, output_error, read_json_file, require_finite
from napari_pathology.slide.backends import PLAUSIBLE_MPP

__all__ = ["SETTINGS_SUFFIX", "remember_mpp", "remembered_mpp", "settings_paths", "user_data_folder",
           "user_file_for", "user_settings_dir"]  # fmt: skip


def user_data_folder() -> Path:
    """The plugin's user data folder (``$NAPARI_PATHOLOGY_DATA`` or the platform's user data dir)."""
    override = os.environ.get("NAPARI_PATHOLOGY_DATA")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("napari-pathology"))


#: Suffix of the small per-slide settings file (``case1.tif`` -> ``case1.tif.napari-pathology.json``).
SETTINGS_SUFFIX = ".napari-pathology.json"


def user_settings_dir() -> Path:
    """Folder for per-slide settings of slides whose own folder is read-only."""
    return user_data_folder() / "slides"


def user_file_for(slide_path: str | Path, folder: Path, suffix: str) -> Path:
    """``folder / <slide name>.<digest of its full path><suffix>``: a per-slide file outside its folder.

    The digest keeps two slides with the same file name in different folders apart.
    """
    slide_path = Path(slide_path).expanduser()
    try:
        full = str(slide_path.resolve())
    except OSError:
        full = str(slide_path.absolute())
    digest = hashlib.sha256(full.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return folder / f"{slide_path.name}.{digest}{suffix}"


def settings_paths(slide_path: str | Path) -> tuple[Path, Path]:
    """Where a slide's settings file lives: beside the slide, else in :func:`user_settings_dir`.

    The fallback name carries a digest of the slide's full path (:func:`user_file_for`).
    """
    slide_path = Path(slide_path).expanduser()
    beside = slide_path.with_name(slide_path.name + SETTINGS_SUFFIX)
    return beside, user_file_for(slide_path, user_settings_dir(), SETTINGS_SUFFIX)


def _read_settings(path: Path) -> dict[str, Any]:
    data = read_json_file(path, "slide settings file")
    if not isinstance(data, dict):
        raise ValueError(f"slide settings file {path} does not hold a JSON object")
    return data


def _valid_mpp(value: Any, where: Path) -> float:
    return require_finite(value, f"um/px in {where}", minimum=PLAUSIBLE_MPP[0], maximum=PLAUSIBLE_MPP[1])


def remembered_mpp(slide_path: str | Path) -> tuple[float | None, Path | None, str | None]:
    """The um/px the user set for a slide earlier, where it was kept, and any problem reading it.

    When both settings files exist (the slide's folder became read-only in between) the
    newer one wins; one saying ``"mpp": null`` means the user went back to the file's um/px.

    Returns
    -------
    tuple
        ``(mpp or None, settings file or None, message or None)``; a settings file that
        cannot be read (or holds a bad um/px) is reported in the message and not used.
    """
    problems = []
    found: list[tuple[float, float | None, Path]] = []
    for path in settings_paths(slide_path):
        try:
            if not path.exists():
                continue
            data = _read_settings(path)
            mpp = None if data.get("mpp") is None else _valid_mpp(data["mpp"], path)
            found.append((path.stat().st_mtime, mpp, path))
        except (OSError, ValueError) as exc:
            problems.append(f"{exc}; the um/px saved there was not used")
    problem = "; ".join(problems) or None
    if not found:
        return None, None, problem
    _, mpp, path = max(found, key=lambda item: item[0])
    return mpp, (path if mpp is not None else None), problem


def remember_mpp(slide_path: str | Path, mpp: float | None) -> Path | None:
    """Keep (or, with None, forget) the user's um/px for a slide in its settings file.

    Written atomically beside the slide, or in :func:`user_settings_dir` when the slide's
    folder cannot be written (the newer file wins on reopen, see :func:`remembered_mpp`).
    Forgetting removes ``mpp`` from the slide's settings files (a file left with nothing
    else is deleted); where the file beside the slide cannot be changed, a fallback file
    saying ``"mpp": null`` overrides it.

    Returns
    -------
    Path or None
        The file that now holds the um/px (None when forgetting).

    Raises
    ------
    OutputError
        When the change cannot be written anywhere (one line naming the folder).
    """
    beside, fallback = settings_paths(slide_path)
    if mpp is None:
        try:
            _write_settings(beside, slide_path, None)
        except OutputError:
            _write_settings(fallback, slide_path, None, keep_null=True)
            return None
        _write_settings(fallback, slide_path, None)
        return None
    mpp = _valid_mpp(mpp, Path(slide_path))
    if os.access(beside.parent, os.W_OK):
        try:
            _write_settings(beside, slide_path, mpp)
        except OutputError:
            pass
        else:
            with contextlib.suppress(OSError):  # stale, and older anyway
                _write_settings(fallback, slide_path, None)
            return beside
    _write_settings(fallback, slide_path, mpp)
    return fallback


def _write_settings(path: Path, slide_path: str | Path, mpp: float | None, keep_null: bool = False) -> None:
    """Set (or clear) ``mpp`` in one settings file, keeping its other entries.

    Clearing deletes a file left with nothing else, unless ``keep_null`` asks for an explicit
    ``"mpp": null`` (which outranks an older file beside the slide).
    """
    if mpp is None and not keep_null and not path.exists():
        return
    try:
        data = _read_settings(path) if path.exists() else {}
    except (OSError, ValueError):
        data = {}  # unreadable: replaced (it held at most a um/px, now superseded)
    data.pop("slide", None)
    data["mpp"] = mpp
    if mpp is None and not keep_null:
        del data["mpp"]
        if not data:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise output_error(exc, path.parent) from exc
            return
    data["slide"] = Path(slide_path).name
    atomic_write(path, json.dumps(data, indent=1) + "\n")
