"""Nucleus annotations: labelled points, purity, CSV / GeoJSON in and out, autosave.

A :class:`NucleusPoints` table holds one row per nucleus: its centroid in slide
micrometres, a label (``unlabeled``, ``tumour``, ``normal``, ``other``), a
tumour probability from a classifier (NaN when not classified), an area (NaN
when unknown, e.g. a nucleus clicked by hand) and where it came from
(``detected``, ``manual``, ``imported``).

Purity follows Noorbakhsh et al. (``METHODS.md`` section 3): ground-truth purity
is tumour / (tumour + normal) labelled nuclei (``other`` and ``unlabeled`` are
left out), predicted purity is the mean tumour probability over the classified
nuclei. Stroma, lymphocytes and other non-tumour cells count as ``normal``
(they are the "normal" cells of tumour purity); ``other`` is for nuclei to
leave out of purity (ambiguous cells, necrosis, artefacts).

No Qt, no napari: numpy and the standard library only. One module per reason to change:
:mod:`.labels` (vocabularies), :mod:`.checks`, :mod:`.table` (:class:`NucleusPoints`),
:mod:`.summaries` (regions), :mod:`.csv_io`, :mod:`.geojson_io`, :mod:`.autosave`,
:mod:`.merge` (imports, detections), :mod:`.export_names` and :mod:`.annotation_files`.
"""

from .annotation_files import GEOJSON_SUFFIXES, read_annotations, write_annotations
from .autosave import (
    SIDECAR_SUFFIX,
    AutosaveRefused,
    AutosaveWriter,
    Restored,
    load_sidecar,
    restore_sidecar,
    save_atomic,
    sidecar_context,
    sidecar_path,
)
from .checks import MAX_COORDINATE_UM, NucleusFileError, check_centroids
from .csv_io import AUTOSAVE_COMMENT, CSV_COLUMNS, read_csv, write_csv
from .export_names import export_path, free_path, protected_paths, refused_export_reason
from .geojson_io import from_geojson, read_geojson, to_geojson, write_geojson
from .labels import (
    LABEL_COLOURS,
    LABELS,
    NORMAL,
    OTHER,
    QUPATH_CLASSES,
    SOURCES,
    TUMOUR,
    UNLABELED,
    parse_label,
)
from .merge import MergeResult, merge_detections, merge_points
from .summaries import SUMMARY_COLUMNS, RegionSummary, counts_text, region_summaries, summary_row
from .table import NucleusPoints

__all__ = [
    "AUTOSAVE_COMMENT",
    "CSV_COLUMNS",
    "GEOJSON_SUFFIXES",
    "LABELS",
    "LABEL_COLOURS",
    "MAX_COORDINATE_UM",
    "NORMAL",
    "OTHER",
    "QUPATH_CLASSES",
    "SIDECAR_SUFFIX",
    "SOURCES",
    "SUMMARY_COLUMNS",
    "TUMOUR",
    "UNLABELED",
    "AutosaveRefused",
    "AutosaveWriter",
    "MergeResult",
    "NucleusFileError",
    "NucleusPoints",
    "RegionSummary",
    "Restored",
    "check_centroids",
    "counts_text",
    "export_path",
    "free_path",
    "from_geojson",
    "load_sidecar",
    "merge_detections",
    "merge_points",
    "parse_label",
    "protected_paths",
    "read_annotations",
    "read_csv",
    "read_geojson",
    "refused_export_reason",
    "region_summaries",
    "restore_sidecar",
    "save_atomic",
    "sidecar_context",
    "sidecar_path",
    "summary_row",
    "to_geojson",
    "write_annotations",
    "write_csv",
    "write_geojson",
]
