"""Nucleus label codes and sources, and tolerant parsing of their names (numpy only).

The names and their spellings are :mod:`napari_pathology.vocabulary`'s; this
module gives them their integer codes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from napari_pathology import vocabulary as words
from napari_pathology.vocabulary import QUPATH_CLASSES as QUPATH_CLASSES  # re-exported

#: Nucleus labels; the index is the integer code stored in :attr:`NucleusPoints.label`.
LABELS = (words.UNLABELED, words.TUMOUR, words.NORMAL, words.OTHER)
#: Where a nucleus came from; the index is the code stored in :attr:`NucleusPoints.source`.
SOURCES = ("detected", "manual", "imported")
#: Display colour of each label (RGB 0-255): tumour red and normal sky blue stay apart for
#: red-green colour-blind eyes (Okabe-Ito blue and yellow) and stand out on pink-purple H&E.
LABEL_COLOURS: dict[str, tuple[int, int, int]] = {
    "unlabeled": (170, 170, 170),
    "tumour": (230, 25, 30),
    "normal": (86, 180, 233),
    "other": (240, 228, 66),
}
UNLABELED, TUMOUR, NORMAL, OTHER = range(4)

#: Every accepted spelling (from :mod:`napari_pathology.vocabulary`) -> its code.
_SYNONYMS: dict[str, int] = {
    spelling: LABELS.index(label)
    for label, spellings in words.NUCLEUS_SPELLINGS.items()
    for spelling in spellings
}


def parse_label(text: str | int) -> int:
    """The code in :data:`LABELS` of a label name, tolerantly.

    Case and surrounding spaces are ignored. Accepted: ``tumour``/``tumor``/``t``
    (also ``cancer``, ``malignant``); ``normal``/``n`` and the non-tumour cell
    types (``stroma``, ``immune cells``, ``lymphocyte``, ``fibroblast``,
    ``epithelial``...), which count as normal for purity; ``other``/``o``
    (also ``necrosis``, ``ignore*``); ``unlabeled``/``unlabelled``/``u``/``none``
    and the empty string. A Python ``int`` is taken as a code; digit strings are
    refused because ``"1"`` could mean tumour in a 0/1 file and a code here.

    Parameters
    ----------
    text : str or int
        Label name (or integer code).

    Returns
    -------
    int
        Index into :data:`LABELS`.

    Raises
    ------
    ValueError
        For an unknown name, listing the accepted ones.

    Examples
    --------
    >>> parse_label("Tumor"), parse_label(" stroma "), parse_label("u")
    (1, 2, 0)

    """
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        if 0 <= int(text) < len(LABELS):
            return int(text)
        raise ValueError(f"label code must be 0-{len(LABELS) - 1} ({', '.join(LABELS)}), got {text}")
    key = " ".join(str(text).strip().lower().split())
    if key in _SYNONYMS:
        return _SYNONYMS[key]
    if key.isdigit():
        raise ValueError(f"numeric label {text!r} is ambiguous; write the name: one of {', '.join(LABELS)}")
    raise ValueError(
        f"unknown nucleus label {text!r}; use one of {', '.join(LABELS)} "
        "(also accepted: tumor, t, n, u, o, stroma, immune cells, lymphocyte, necrosis)"
    )


def _parse_source(text: str | int) -> int:
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        if 0 <= int(text) < len(SOURCES):
            return int(text)
    else:
        key = str(text).strip().lower()
        if key in SOURCES:
            return SOURCES.index(key)
        if key == "":
            return SOURCES.index("imported")
    raise ValueError(f"unknown nucleus source {text!r}; use one of {', '.join(SOURCES)}")


def _codes(names: Sequence[str], parse: Any, where: Callable[[int], str] | None = None) -> np.ndarray:
    """Parse each distinct name once (fast for 10^6 rows of a few names); an error names its first row."""
    unique, inverse = np.unique(np.asarray(names, dtype=str), return_inverse=True)
    codes = []
    for k, name in enumerate(unique):
        try:
            codes.append(parse(str(name)))
        except ValueError as exc:
            if where is None:
                raise
            raise ValueError(f"{where(int(np.flatnonzero(inverse == k)[0]))}: {exc}") from None
    table = np.array(codes, np.int8)
    return table[inverse].astype(np.int8) if len(unique) else np.zeros(0, np.int8)
