"""The Nuclei panel's files: autosave beside the slide (restored on open), import and export.

Mixed into :class:`~napari_pathology._widgets.nuclei_panel.NucleiPanel`; the files themselves are
:mod:`napari_pathology.nuclei.points` (``AutosaveWriter``, ``read_annotations``, ``write_annotations``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from qtpy.QtWidgets import QFileDialog, QGroupBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout

from napari_pathology._widgets._workers import run_in_thread
from napari_pathology._widgets.nuclei_labelling import LAYER_TOKEN
from napari_pathology._widgets.nuclei_layers import add_nuclei_layer, points_from_layer, replace_points
from napari_pathology.nuclei.points import (
    AutosaveRefused,
    export_path,
    merge_points,
    read_annotations,
    restore_sidecar,
    sidecar_path,
    write_annotations,
)

_ANNOTATION_FILTER = "Nuclei (*.geojson *.json *.csv);;All files (*)"


class AnnotationFiles:
    """Annotations box: Import / Export GeoJSON / Export CSV, and the autosave and its status line."""

    def _build_files_box(self) -> QGroupBox:
        box = QGroupBox("Annotations")
        import_button = QPushButton("Import...")
        import_button.clicked.connect(self._choose_import)
        geojson_button = QPushButton("Export GeoJSON...")
        geojson_button.clicked.connect(lambda: self._choose_export("GeoJSON (*.geojson)", ".geojson"))
        csv_button = QPushButton("Export CSV...")
        csv_button.clicked.connect(lambda: self._choose_export("CSV (*.csv)", ".csv"))
        self.autosave_label = QLabel("")
        self.autosave_label.setWordWrap(True)
        buttons = QHBoxLayout()
        for button in (import_button, geojson_button, csv_button):
            buttons.addWidget(button)
        inner = QVBoxLayout(box)
        inner.addLayout(buttons)
        inner.addWidget(self.autosave_label)
        return box

    def _sidecar_for(self, slide: Any) -> Path | None:
        """Beside the slide, or in the user data folder when the slide's folder is read-only."""
        path = slide.metadata.get("path")
        if not path:
            return None
        try:
            return sidecar_path(path)
        except OSError as exc:
            self.autosave_label.setText(f"Autosave is off for {slide.name}: {exc}")
            return None

    def _restore(self, slide: Any) -> None:
        from napari.utils.notifications import show_error, show_warning

        path = self.autosave_path
        try:
            restored = restore_sidecar(path, self.extent_um(), self.mpp)
        except AutosaveRefused as exc:
            if exc.kept_as is None:  # still there and unreadable: never write over it
                self.autosave_path = None
                self.autosave_label.setText(f"Autosave is off for {slide.name}: {exc}")
            else:
                self.autosave_label.setText(f"The refused autosave was kept as {exc.kept_as}.")
            show_error(f"Could not restore autosaved nuclei: {exc}")
            return
        points = restored.points
        if points is None or not len(points):
            return
        layer = self._adopt(add_nuclei_layer(self.viewer, slide, points, f"{slide.name} nuclei"))
        self._autosave_writer.claim(path, layer.metadata[LAYER_TOKEN])
        self.status.setText(f"Restored {len(points)} nuclei from {path}.")
        if restored.note:
            self.status.setText(f"Restored {len(points)} nuclei from {path}; {restored.note}.")
            show_warning(restored.note)

    def autosave(self) -> Any:
        """Write the nuclei to the sidecar file in a background thread; returns the worker or None.

        Atomic, in order, and never over a file this panel does not hold (that one is kept
        aside first); nuclei outside the slide are left out so that the file reads back.
        """
        if self.autosave_path is None or (self._layer is None and self.nuclei_layer() is None):
            return None
        layer = self._layer
        path, points = self.autosave_path, self.current_points()
        xy = points.xy_um()
        width, height = self.extent_um()
        outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] > width) | (xy[:, 1] > height)
        if outside.any():  # the file must read back: never write what the reader refuses
            points = points.subset(~outside)
        writer = self._autosave_writer
        job = (writer.ticket(), points, path, layer.metadata[LAYER_TOKEN], self.mpp, (width, height))

        def done(result: tuple[int, Path | None] | None) -> None:
            if result is None:
                return
            text = f"Autosaved {result[0]} nuclei to {path} at {time.strftime('%H:%M:%S')}"
            if result[1] is not None:
                text += f"; the earlier autosave there was kept as {result[1].name}"
            if outside.any():
                text += f"; {int(outside.sum())} nuclei outside the slide are not saved"
            self.autosave_label.setText(text + ".")

        def failed(error: BaseException) -> None:
            from napari.utils.notifications import show_error

            self.autosave_label.setText(f"Autosave FAILED: {error}")
            show_error(f"Autosave of the nuclei failed: {error}")

        return run_in_thread(writer.save, *job, on_done=done, on_error=failed)

    def export_annotations(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the nuclei as GeoJSON (QuPath; level-0 pixels) or CSV, by the file's suffix.

        Never over the slide, its autosave or a synthetic slide's truth files (refused), and
        over another existing file only with ``overwrite`` (else the first free numbered
        name is used); returns the path written.
        """
        slide = self.slide_layer()
        points = self.current_points()
        slide_path = slide.metadata.get("path") if slide is not None else None
        path, chosen = write_annotations(points, path, slide_path, self.mpp, overwrite)
        note = f" ({path.name} exists, so a new name was used)" if chosen != path else ""
        self.status.setText(f"Saved {len(points)} nuclei to {chosen}{note}")
        return chosen

    def import_annotations(self, path: str | Path) -> int:
        """Merge nuclei from a GeoJSON (QuPath) or CSV file into the nuclei layer; returns how many are new.

        Coordinates are checked against the slide (finite, inside it; the row or feature
        is named). A nucleus within 1 um of one already there with the same label, or
        where either is unlabeled, is that nucleus (the imported label replaces
        ``unlabeled``): importing a file twice adds nothing the second time.
        """
        path = Path(path)
        if self.slide_layer() is None:
            raise ValueError("Open the slide the annotations belong to first.")
        found = read_annotations(path, self.mpp, self.extent_um())
        layer = self.nuclei_layer(create=True)
        result = merge_points(points_from_layer(layer, self.mpp), found)
        replace_points(layer, result.points, self.mpp)
        self.recount()
        self._autosave_timer.start()
        self.status.setText(f"Imported {len(found)} nuclei from {path.name}: {result.summary()}.")
        return result.added

    def _choose_import(self) -> None:
        from napari.utils.notifications import show_error

        path, _ = QFileDialog.getOpenFileName(self, "Import nuclei", "", _ANNOTATION_FILTER)
        if path:
            try:
                self.import_annotations(path)
            except (OSError, ValueError) as exc:
                show_error(str(exc))

    def _choose_export(self, file_filter: str, suffix: str) -> None:
        from napari.utils.notifications import show_error

        slide = self.slide_layer()
        start = str(export_path(slide.metadata.get("path") if slide else None, suffix)) if slide else ""
        path, _ = QFileDialog.getSaveFileName(self, "Export nuclei", start, file_filter)
        if path:
            # the dialog asked before replacing the name it returned; a suffix added here was not asked about
            confirmed = bool(Path(path).suffix)
            try:
                self.export_annotations(path if confirmed else path + suffix, overwrite=confirmed)
            except (OSError, ValueError) as exc:
                show_error(str(exc))
