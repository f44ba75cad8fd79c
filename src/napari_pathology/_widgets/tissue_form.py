"""The Tissue panel's Detection box: method and parameters, read back as :class:`TissueParams`.

:class:`TissueFormMixin` builds the fields on the panel itself (tests and
scripts reach them as ``panel.method_combo``, ``panel.gray_spin``...) and
shows only the threshold row the chosen method uses.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QSpinBox

from napari_pathology.tissue import DEFAULT_PARAMS, TissueParams

__all__ = ["METHOD_CHOICES", "TissueFormMixin", "style_tissue_layer"]

#: Methods as shown in the combo box, with their :class:`TissueParams` names.
METHOD_CHOICES = (
    ("Saturation (CLAM)", "saturation"),
    ("Otsu (grayscale)", "otsu"),
    ("Gray > 0.8 is background (Liu)", "gray"),
)

SQUARE_MM = " mm\N{SUPERSCRIPT TWO}"


def style_tissue_layer(layer: Any, fill: bool) -> None:
    """The tissue as its outline (the H&E stays visible), or filled at 35% when ``fill``."""
    layer.contour = 0 if fill else 2
    layer.opacity = 0.35 if fill else 0.9


def _double_spin(
    low: float, high: float, value: float, decimals: int, suffix: str, step: float
) -> QDoubleSpinBox:
    spin = QDoubleSpinBox()
    spin.setRange(low, high)
    spin.setDecimals(decimals)
    spin.setSingleStep(step)
    spin.setValue(value)
    spin.setSuffix(suffix)
    return spin


class TissueFormMixin:
    """The Detection box of :class:`~napari_pathology._widgets.tissue_panel.TissuePanel` (a QWidget)."""

    def _make_fill_check(self) -> None:
        """The "Fill" box: the tissue layer shows its outline unless it is ticked."""
        self.fill_check = QCheckBox("Fill the tissue (else its outline)")
        self.fill_check.toggled.connect(self._fill_toggled)

    def _fill_toggled(self, fill: bool) -> None:
        if self.tissue_layer is not None:
            style_tissue_layer(self.tissue_layer, fill)

    def _make_params_box(self) -> QGroupBox:
        """Build the parameter fields (defaults: :data:`~napari_pathology.tissue.DEFAULT_PARAMS`)."""
        defaults = DEFAULT_PARAMS
        self.method_combo = QComboBox()
        for text, method in METHOD_CHOICES:
            self.method_combo.addItem(text, method)
        self.method_combo.setCurrentIndex(self.method_combo.findData(defaults.method))
        self.method_combo.setToolTip(
            "Saturation: CLAM's HSV-saturation threshold (robust default).\n"
            "Otsu: automatic threshold on grayscale.\n"
            "Gray: Liu et al.'s rule, background where gray > 0.8."
        )
        self.method_combo.currentIndexChanged.connect(self._update_method_rows)
        self.mask_mpp_spin = _double_spin(0.5, 128.0, defaults.mask_mpp, 1, " um/px", 1.0)
        self.mask_mpp_spin.setToolTip("Resolution of the mask (coarser is faster)")
        self.saturation_spin = QSpinBox()
        self.saturation_spin.setRange(0, 255)
        self.saturation_spin.setSpecialValueText("Otsu")
        self.saturation_spin.setValue(int(defaults.saturation_threshold or 0))
        self.saturation_spin.setToolTip("Saturation (0-255) above which a pixel is tissue; 0 = Otsu")
        self.gray_spin = _double_spin(0.0, 1.0, defaults.gray_threshold, 2, "", 0.05)
        self.gray_spin.setToolTip("Gray value (0-1) above which a pixel is background")
        self.median_spin = _double_spin(0.0, 1000.0, defaults.median_um, 0, " um", 8.0)
        self.closing_spin = _double_spin(0.0, 1000.0, defaults.closing_um, 0, " um", 8.0)
        self.min_area_spin = _double_spin(0.0, 100.0, defaults.min_tissue_area_mm2, 3, SQUARE_MM, 0.01)
        self.min_area_spin.setToolTip("Drop tissue pieces smaller than this")
        self.min_hole_spin = _double_spin(0.0, 100.0, defaults.min_hole_area_mm2, 3, SQUARE_MM, 0.01)
        self.min_hole_spin.setToolTip("Fill holes smaller than this")
        self.fill_holes_check = QCheckBox("Fill all holes")
        self.fill_holes_check.setChecked(defaults.fill_holes)
        self.exclude_pen_check = QCheckBox("Exclude pen marks")
        self.exclude_pen_check.setChecked(defaults.exclude_pen)
        self.exclude_pen_check.setToolTip("Remove green, blue and red marker ink from the mask")

        box = QGroupBox("Detection")
        self.form = QFormLayout(box)
        self.form.addRow("Method", self.method_combo)
        self.form.addRow("Mask resolution", self.mask_mpp_spin)
        self.form.addRow("Saturation threshold", self.saturation_spin)
        self.form.addRow("Gray threshold", self.gray_spin)
        self.form.addRow("Median blur", self.median_spin)
        self.form.addRow("Closing", self.closing_spin)
        self.form.addRow("Min. tissue piece", self.min_area_spin)
        self.form.addRow("Min. kept hole", self.min_hole_spin)
        self.form.addRow(self.fill_holes_check)
        self.form.addRow(self.exclude_pen_check)
        return box

    def params(self) -> TissueParams:
        """The parameters set in the panel."""
        saturation = self.saturation_spin.value()
        return TissueParams(
            method=self.method_combo.currentData(),
            mask_mpp=float(self.mask_mpp_spin.value()),
            saturation_threshold=None if saturation == 0 else float(saturation),
            gray_threshold=float(self.gray_spin.value()),
            median_um=float(self.median_spin.value()),
            closing_um=float(self.closing_spin.value()),
            min_tissue_area_mm2=float(self.min_area_spin.value()),
            min_hole_area_mm2=float(self.min_hole_spin.value()),
            fill_holes=self.fill_holes_check.isChecked(),
            exclude_pen=self.exclude_pen_check.isChecked(),
        )

    def _update_method_rows(self, *_: Any) -> None:
        method = self.method_combo.currentData()
        for field, visible in (
            (self.saturation_spin, method == "saturation"),
            (self.gray_spin, method == "gray"),
        ):
            field.setVisible(visible)
            label = self.form.labelForField(field)
            if label is not None:
                label.setVisible(visible)
