"""The tumour/normal vocabulary: canonical names, the spellings each kind of input accepts, QuPath names.

The one home of these words. Canonical names are :data:`TUMOUR` and
:data:`NORMAL` (British spelling, lower case); every reader maps what it is
given onto them here:

- **slide-level labels** (a slide table's ``label`` column, a drawn region's
  label): :data:`SLIDE_TUMOUR_SPELLINGS` and :data:`SLIDE_NORMAL_SPELLINGS`,
  which include binary spellings (``positive``, ``1``, ``true``...);
  :func:`slide_label` maps one;
- **nucleus labels** (the Nuclei panel, CSV and GeoJSON of nuclei):
  :data:`NUCLEUS_SPELLINGS`, with one-letter keys and cell types that count as
  normal for purity, and no digits (``"1"`` could be a code or a class);
- **QuPath classification names** written to GeoJSON: :data:`QUPATH_CLASSES`,
  with :data:`REGION_COLOURS` for tumour/normal regions.

Pure Python: no numpy, no Qt.
"""

from __future__ import annotations

__all__ = [
    "NORMAL",
    "NUCLEUS_SPELLINGS",
    "OTHER",
    "QUPATH_CLASSES",
    "REGION_COLOURS",
    "SLIDE_NORMAL_SPELLINGS",
    "SLIDE_TUMOUR_SPELLINGS",
    "TUMOUR",
    "UNLABELED",
    "slide_label",
]

#: The canonical class names.
TUMOUR, NORMAL = "tumour", "normal"
#: Canonical names of the nucleus-only labels: not yet labelled, and neither class (ignored for purity).
UNLABELED, OTHER = "unlabeled", "other"

#: Spellings of the tumour class in slide-level labels (lower case).
SLIDE_TUMOUR_SPELLINGS = (TUMOUR, "tumor", "positive", "1", "true", "cancer", "metastasis")
#: Spellings of the normal class in slide-level labels (lower case).
SLIDE_NORMAL_SPELLINGS = (NORMAL, "negative", "0", "false", "benign")

#: Spellings of each nucleus label (lower case, inner spaces single); the empty string is unlabeled.
NUCLEUS_SPELLINGS: dict[str, tuple[str, ...]] = {
    UNLABELED: (UNLABELED, "unlabelled", "none", "unknown", "unclassified", "u", ""),
    TUMOUR: (TUMOUR, "tumor", "t", "cancer", "malignant", "neoplastic", "tumour cell", "tumor cell"),
    NORMAL: (
        NORMAL, "n", "benign", "non-tumour", "non-tumor", "nontumour", "nontumor", "stroma", "stromal",
        "immune", "immune cells", "lymphocyte", "lymphocytes", "fibroblast", "epithelial", "histiocyte",
        "macrophage",
    ),
    OTHER: (OTHER, "o", "necrosis", "ignore", "ignore*", "exclude", "artefact", "artifact"),
}  # fmt: skip

#: QuPath classification name of each label (``unlabeled`` is written unclassified).
QUPATH_CLASSES: dict[str, str] = {TUMOUR: "Tumor", NORMAL: "Normal", OTHER: "Other"}
#: Colour (RGB 0-255) of tumour and normal regions written as GeoJSON (as QuPath's Tumor class).
REGION_COLOURS: dict[str, tuple[int, int, int]] = {TUMOUR: (200, 0, 0), NORMAL: (0, 160, 60)}


def slide_label(label: object) -> str | None:
    """:data:`TUMOUR` or :data:`NORMAL` for any slide-level spelling of them, None for anything else.

    Case and surrounding spaces are ignored.

    Examples
    --------
    >>> slide_label(" Tumor "), slide_label("negative"), slide_label("LUAD"), slide_label(None)
    ('tumour', 'normal', None, None)
    """
    if label is None:
        return None
    value = str(label).strip().lower()
    if value in SLIDE_TUMOUR_SPELLINGS:
        return TUMOUR
    if value in SLIDE_NORMAL_SPELLINGS:
        return NORMAL
    return None
