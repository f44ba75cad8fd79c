"""The Train panel's set-up form: family, starting point, data, hyper-parameters, device, output.

:class:`TrainFormMixin` builds the fields on the panel itself (tests and
scripts reach them as ``panel.family_combo``, ``panel.out_edit`` and so on),
generates the hyper-parameter rows from the chosen family's settings
dataclass (:class:`~napari_pathology._widgets.train_settings.SettingsForm`;
``panel.setting_widget("steps").value``), follows the viewer's Shapes layers
and reads the drawn regions. What the values mean for a job is computed in
:mod:`napari_pathology.training.panel_jobs` and
:mod:`napari_pathology.training.regions` (no Qt).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from napari_pathology._widgets._common import (
    SlideLayerCombo,
    choose_checkpoint,
    choose_folder_into,
    device_combo,
    select_or_add,
    shape_rings_px,
)
from napari_pathology._widgets.train_settings import SettingsForm
from napari_pathology.training.panel_jobs import default_models_dir, trainable_families

if TYPE_CHECKING:
    from napari_pathology.geometry import Polygon

__all__ = [
    "SOURCE_TABLE",
    "SOURCE_VIEWER",
    "TrainFormMixin",
    "default_models_dir",
    "shapes_to_polygons",
    "trainable_families",
]

#: Data sources, as stored in the source combo.
SOURCE_VIEWER, SOURCE_TABLE = "viewer", "table"


def shapes_to_polygons(shapes_layer: Any, slide_layer: Any) -> tuple[dict[str, list[Polygon]], list[str]]:
    """Polygons of a Shapes layer in a slide layer's level-0 pixels ``(x, y)``, by label, and problems.

    Areas only (see :func:`~napari_pathology._widgets._common.shape_rings_px`); the
    ``label`` feature says tumour or normal (tumour when absent). Returns
    ``({"tumour": [...], "normal": [...]}, problems)``, each polygon ``[ring]``
    with ring ``(n, 2)`` in px, and the shapes skipped and why.
    """
    from napari_pathology.training.regions import group_regions

    n = len(shapes_layer.data)
    features = getattr(shapes_layer, "features", None)
    labels = list(features["label"]) if features is not None and "label" in features else [None] * n
    return group_regions(shape_rings_px(shapes_layer, slide_layer), labels)


class TrainFormMixin:
    """The set-up fields of :class:`~napari_pathology._widgets.train_panel.TrainPanel` (a QWidget).

    The panel provides ``viewer`` and ``_families`` before :meth:`_make_form_fields`.
    """

    def _make_form_fields(self, napari_viewer: Any) -> None:
        from napari_pathology.training.regions import REGION_LABELS

        # --- model
        self.family_combo = QComboBox()
        for name in self._families:
            self.family_combo.addItem(name, name)
        self.start_combo = QComboBox()
        self.start_combo.setToolTip("Registry model to train from scratch, or trained weights to fine-tune")
        self.load_checkpoint_button = QPushButton("Load checkpoint...")
        self.load_checkpoint_button.clicked.connect(self._choose_checkpoint)
        self.start_info = QLabel()
        self.start_info.setWordWrap(True)

        # --- data
        self.source_combo = QComboBox()
        self.source_combo.addItem("Viewer annotations", SOURCE_VIEWER)
        self.source_combo.addItem("Slide table (CSV)", SOURCE_TABLE)
        self.slide_combo = SlideLayerCombo(napari_viewer)
        self.shapes_combo = QComboBox()
        self.shapes_combo.setToolTip("Shapes layer with a 'label' feature: tumour (default) or normal")
        self.shapes_combo.setPlaceholderText("no Shapes layer: click New")
        self.new_layer_button = QPushButton("New")
        self.new_layer_button.setToolTip("Add a Shapes layer for tumour / normal regions")
        self.new_layer_button.clicked.connect(self.add_annotation_layer)
        self.draw_label_combo = QComboBox()
        self.draw_label_combo.addItems(list(REGION_LABELS))
        self.draw_label_combo.setToolTip("Label of the next shapes drawn in the annotation layer")
        self.draw_label_combo.currentTextChanged.connect(self._draw_label_changed)
        self.table_edit = QLineEdit()
        self.table_edit.setPlaceholderText("slides.csv: slide, label, annotations[, normal_annotations]")
        self.table_browse = QPushButton("...")
        self.table_browse.setMaximumWidth(30)
        self.table_browse.clicked.connect(self._choose_table)

        # --- hyper-parameters: generated from the chosen family's settings dataclass
        self.settings_box = QGroupBox("Training settings")
        self._settings_layout = QVBoxLayout(self.settings_box)
        self._settings_layout.setContentsMargins(6, 6, 6, 6)
        self.settings_form: SettingsForm | None = None
        self.device_combo = device_combo()
        self.out_edit = QLineEdit(str(default_models_dir()))
        self._out_browse = out_browse = QPushButton("...")
        out_browse.setMaximumWidth(30)
        out_browse.clicked.connect(self._choose_out_dir)
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("automatic (family-data-time)")

    def _form_widget(self) -> QWidget:
        """The Set-up tab: a form over the fields, scrolling when the dock is short."""
        out_browse = self._out_browse
        setup = QWidget()
        form = QFormLayout(setup)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.addRow("Family", self.family_combo)
        start_row = QHBoxLayout()
        start_row.addWidget(self.start_combo, 1)
        start_row.addWidget(self.load_checkpoint_button)
        form.addRow("Start from", start_row)
        form.addRow("", self.start_info)
        form.addRow("Data", self.source_combo)
        form.addRow("Slide", self.slide_combo)
        shapes_row = QHBoxLayout()
        shapes_row.addWidget(self.shapes_combo, 1)
        shapes_row.addWidget(self.new_layer_button)
        self._shapes_row = QWidget()
        self._shapes_row.setLayout(shapes_row)
        shapes_row.setContentsMargins(0, 0, 0, 0)
        form.addRow("Regions", self._shapes_row)
        form.addRow("Draw as", self.draw_label_combo)
        table_row = QHBoxLayout()
        table_row.setContentsMargins(0, 0, 0, 0)
        table_row.addWidget(self.table_edit, 1)
        table_row.addWidget(self.table_browse)
        self._table_row = QWidget()
        self._table_row.setLayout(table_row)
        form.addRow("Table", self._table_row)
        form.addRow(self.settings_box)
        form.addRow("Device", self.device_combo)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(out_browse)
        form.addRow("Output", out_row)
        form.addRow("Name", self.name_edit)
        self._form = form
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(setup)
        return scroll

    def _set_row_visible(self, field: QWidget, visible: bool) -> None:
        label = self._form.labelForField(field)
        field.setVisible(visible)
        if label is not None:
            label.setVisible(visible)

    # ------------------------------------------------------------------ public state
    @property
    def family(self) -> str:
        """The chosen model family."""
        return str(self.family_combo.currentData() or "")

    @property
    def start_source(self) -> str:
        """Registry name or checkpoint path to start from."""
        return str(self.start_combo.currentData() or "")

    @property
    def source(self) -> str:
        """:data:`SOURCE_VIEWER` or :data:`SOURCE_TABLE`."""
        return str(self.source_combo.currentData())

    @property
    def shapes_layer(self) -> Any:
        """The chosen Shapes layer, or None."""
        name = self.shapes_combo.currentText()
        for layer in self.viewer.layers:
            if layer.name == name and layer._type_string == "shapes":
                return layer
        return None

    def setting_widget(self, name: str) -> Any:
        """The magicgui widget of the chosen family's setting ``name`` (``.value`` reads and sets it)."""
        if self.settings_form is None:
            raise KeyError(f"no family is chosen: no setting {name!r}")
        return self.settings_form.widget(name)

    def settings_values(self) -> dict[str, Any]:
        """The chosen family's settings as the form says them (None: the family's default).

        Raises
        ------
        TrainingError
            Naming a setting whose text is not a value of its kind.
        """
        return {} if self.settings_form is None else self.settings_form.values()

    def select_family(self, family: str) -> None:
        """Choose a trainable family by name (one of the panel's family list)."""
        index = self.family_combo.findData(family)
        if index < 0:
            raise ValueError(f"{family!r} is not a trainable family ({', '.join(self._families)})")
        self.family_combo.setCurrentIndex(index)

    def select_start(self, source: str | Path, label: str | None = None) -> None:
        """Start from a registry name or a checkpoint path (added to the list)."""
        source = str(source)
        select_or_add(self.start_combo, source, label or f"{Path(source).name} (checkpoint: fine-tune)")

    def set_source(self, source: str) -> None:
        """Train from :data:`SOURCE_VIEWER` (drawn regions) or :data:`SOURCE_TABLE` (a CSV)."""
        self.source_combo.setCurrentIndex(self.source_combo.findData(source))

    # ------------------------------------------------------------------ field reactions
    def _family_changed(self, *_: Any) -> None:
        from napari_pathology.models import list_models
        from napari_pathology.models.pretrained import is_untrained

        family = self.family
        if family not in self._families:
            return
        chosen = self._families[family]
        self.start_combo.blockSignals(True)
        self.start_combo.clear()
        specs = [s for s in list_models() if s.family == family]
        for spec in sorted(specs, key=lambda s: (is_untrained(s), s.name)):
            what = "train from scratch" if is_untrained(spec) else "fine-tune"
            self.start_combo.addItem(f"{spec.name} ({what})", spec.name)
        self.start_combo.blockSignals(False)
        self.start_combo.setCurrentIndex(0)
        self._start_changed()
        if self.settings_form is not None:
            self.settings_form.close()
        self.settings_form = SettingsForm(chosen)
        self._settings_layout.addWidget(self.settings_form.native)
        self.settings_box.setTitle(f"Training settings ({family})")
        # A family that learns from slide labels needs a table of slides.
        regions = "regions" in chosen.data_sources
        item = self.source_combo.model().item(self.source_combo.findData(SOURCE_VIEWER))
        item.setEnabled(regions)
        if not regions:
            self.set_source(SOURCE_TABLE)
        self._source_changed()

    def _start_changed(self, *_: Any) -> None:
        from napari_pathology.models import ModelError, checkpoint_info, get_spec
        from napari_pathology.models.pretrained import is_untrained

        source = self.start_source
        if not source:
            self.start_info.setText("")
            return
        try:
            if Path(source).suffix:
                spec = checkpoint_info(source)["spec"]
                what = f"checkpoint {Path(source).name}"
            else:
                spec = get_spec(source).to_dict()
                what = "untrained: training from scratch" if is_untrained(get_spec(source)) else "fine-tune"
        except (ModelError, OSError, ValueError) as error:
            self.start_info.setText(f"<i>{error}</i>")
            return
        self.start_info.setText(
            f"<small>{what}; {spec['input_size']} px at {spec['mpp']:g} um/px, "
            f"classes {', '.join(spec['classes'])}</small>"
        )

    def _source_changed(self, *_: Any) -> None:
        viewer = self.source == SOURCE_VIEWER
        form = self.settings_form
        if form is not None and "val_fraction" in form.fields:  # one annotated slide cannot be split
            form.widget("val_fraction").value = 0.0 if viewer else form.fields["val_fraction"].default
        for widget in (self.slide_combo, self._shapes_row, self.draw_label_combo):
            self._set_row_visible(widget, viewer)
        self._set_row_visible(self._table_row, not viewer)

    def _sync_shapes(self, *_: Any) -> None:
        current = self.shapes_combo.currentText()
        names = [layer.name for layer in self.viewer.layers if layer._type_string == "shapes"]
        self.shapes_combo.blockSignals(True)
        self.shapes_combo.clear()
        self.shapes_combo.addItems(names)
        if current in names:
            self.shapes_combo.setCurrentText(current)
        self.shapes_combo.blockSignals(False)

    def _draw_label_changed(self, label: str) -> None:
        layer = self.shapes_layer
        if layer is None or "label" not in layer.features:
            return
        try:
            layer.feature_defaults = {"label": label}
        except (ValueError, TypeError):  # a non-categorical label column of another type
            pass

    def add_annotation_layer(self) -> Any:
        """Add (and choose) a Shapes layer for regions: a ``label`` feature, tumour red, normal green."""
        import pandas as pd

        from napari_pathology.training.regions import REGION_LABELS

        slide = self.slide_combo.current_layer()
        name = f"{slide.name} training regions" if slide is not None else "training regions"
        features = pd.DataFrame({"label": pd.Categorical([], categories=list(REGION_LABELS))})
        extent = {}
        if slide is not None:  # edges a few screen pixels wide when the whole slide is in view
            height, width = np.asarray(slide.extent.world[1] - slide.extent.world[0])[-2:]
            extent = {"units": slide.units, "edge_width": max(height, width) / 200}
        layer = self.viewer.add_shapes(
            name=name, features=features, feature_defaults={"label": self.draw_label_combo.currentText()},
            edge_color="label", edge_color_cycle=["#ff3030", "#30ff60"], face_color="transparent",
            **{"edge_width": 4, **extent},
        )  # fmt: skip
        layer.mode = "add_polygon"
        self._sync_shapes()
        self.shapes_combo.setCurrentText(layer.name)
        return layer

    def _choose_checkpoint(self) -> None:
        path = choose_checkpoint(self, "Start from checkpoint")
        if path:
            self.select_start(path)

    def _choose_table(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Slide table", "", "CSV (*.csv);;All files (*)")
        if path:
            self.table_edit.setText(path)

    def _choose_out_dir(self) -> None:
        choose_folder_into(self, self.out_edit, "Output folder")

    # ------------------------------------------------------------------ reading the form
    def _data_name(self) -> str:
        """What the data is called in an automatic job name: the slide layer or the table's stem."""
        if self.source == SOURCE_VIEWER:
            layer = self.slide_combo.current_layer()
            return layer.name if layer is not None else "slide"
        return Path(self.table_edit.text().strip() or "table").stem

    def _write_viewer_data(self, folder: Path, name: str) -> Path:
        """Check the drawn regions and write them (GeoJSON, level-0 px) with a one-row slide table."""
        from napari_pathology.training.events import TrainingError
        from napari_pathology.training.regions import check_regions, check_slide_metadata, write_region_data

        slide = self.slide_combo.current_layer()
        if slide is None:
            raise TrainingError("open a slide first (File > Open), then draw tumour regions on it")
        check_slide_metadata(slide.name, slide.metadata)
        shapes = self.shapes_layer
        if shapes is None:
            raise TrainingError(
                "no annotations: add a Shapes layer (New) and draw tumour regions (label 'tumour'), "
                "optionally normal ones (label 'normal')"
            )
        regions, problems = shapes_to_polygons(shapes, slide)
        check_regions(shapes.name, regions, problems)
        return write_region_data(folder, name, regions, slide.metadata)
