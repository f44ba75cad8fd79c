"""Export file names: never the slide, its autosave or a synthetic slide's truth, never an existing file."""

from __future__ import annotations

import os
from pathlib import Path

from .autosave import SIDECAR_SUFFIX, sidecar_path


def protected_paths(slide_path: str | os.PathLike[str]) -> dict[Path, str]:
    """Files an export must never replace: the slide, its autosave and a synthetic slide's truth files."""
    from napari_pathology.slide.synthetic import truth_paths

    slide_path = Path(slide_path)
    out = {
        slide_path: "the slide itself",
        slide_path.with_name(slide_path.name + SIDECAR_SUFFIX): "the autosave",
    }
    for key, path in truth_paths(slide_path).items():
        if key != "slide_path":
            out[path] = "a synthetic slide's ground truth (written by napari-pathology synth)"
    return out


def refused_export_reason(
    path: str | os.PathLike[str], slide_path: str | os.PathLike[str] | None
) -> str | None:
    """Why ``path`` must not be an export target for ``slide_path`` (None when it may be)."""
    if slide_path is None:
        return None
    target = Path(path).expanduser().resolve()
    extra = {}
    try:
        extra[sidecar_path(slide_path).resolve()] = "the autosave"
    except OSError:
        pass
    for protected, why in {
        **{p.resolve(): w for p, w in protected_paths(slide_path).items()},
        **extra,
    }.items():
        if target == protected:
            return why
    return None


def free_path(path: str | os.PathLike[str]) -> Path:
    """``path`` when nothing is there, else ``<stem>-2<suffix>``, ``<stem>-3<suffix>``... (the first free)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return path
    for n in range(2, 100_000):
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
    raise OSError(f"no free file name like {path} in {path.parent}")


def export_path(
    slide_path: str | os.PathLike[str] | None, suffix: str, folder: str | os.PathLike[str] | None = None
) -> Path:
    """The file name to propose for exporting a slide's nuclei.

    ``<slide stem>.annotations<suffix>`` beside the slide (or in ``folder``),
    numbered (``-2``, ``-3``...) when taken: never the autosave
    (``<slide name>.nuclei.csv``), never a synthetic slide's ground truth
    (``<stem>.nuclei.csv``), never an existing file.
    """
    if not suffix.startswith("."):
        suffix = "." + suffix
    slide = Path(slide_path) if slide_path else Path("nuclei")
    base = Path(folder) if folder is not None else slide.parent
    candidate = free_path(base / f"{slide.with_suffix('').name}.annotations{suffix}")
    while slide_path is not None and refused_export_reason(candidate, slide_path):  # pragma: no cover
        candidate = free_path(candidate.with_name(candidate.stem + "-export" + candidate.suffix))
    return candidate
