"""The Train panel's hyper-parameter rows, generated with magicgui from the family's settings dataclass.

The settings dataclass is the single source of every default: each field the
panel does not set itself (:func:`~napari_pathology.training.panel_jobs.form_fields`)
becomes a magicgui widget, labelled from its name, with its numpydoc help as
tooltip: a check box for a flag, a spin box for a count or a real (ranges from
:func:`~napari_pathology.training.panel_jobs.setting_range`), a text field for
an optional number (empty: the family's default, said in grey), a name, a path
or a list of names. A family added in its own folder gets its rows without any
change here.
"""

from __future__ import annotations

from typing import Any

from magicgui.widgets import LineEdit, create_widget
from qtpy.QtWidgets import QFormLayout, QLabel, QWidget

from napari_pathology.training.panel_jobs import (
    form_fields,
    paper_default,
    parse_setting,
    setting_label,
    setting_range,
    setting_text,
)

__all__ = ["SettingsForm"]


def _decimals(value: float) -> int:
    """Decimals a spin box needs to show ``value`` exactly (at most 8)."""
    text = f"{value:.8f}".rstrip("0")
    return min(8, max(2, len(text.split(".")[1]) if "." in text else 0))


class SettingsForm:
    """The training settings of one family: one magicgui widget per field, in a Qt form (aligned labels).

    Parameters
    ----------
    family : Family
        The family whose ``settings`` dataclass the rows come from.
    """

    def __init__(self, family: Any) -> None:
        self.family = family
        self.fields = {field.name: field for field in form_fields(family)}
        self._widgets = {name: self._make(field) for name, field in self.fields.items()}
        self.native = QWidget()  # the Qt widget to put in a layout
        form = QFormLayout(self.native)
        form.setContentsMargins(0, 0, 0, 0)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        for name, widget in self._widgets.items():
            if self.fields[name].kind == "bool":  # the check box says its label itself
                form.addRow("", widget.native)
                continue
            label = QLabel(widget.label)
            label.setToolTip(widget.tooltip or "")
            form.addRow(label, widget.native)

    def _make(self, field: Any) -> Any:
        label = setting_label(self.family, field)
        options = {"tooltip": field.help or label}
        if field.kind == "bool":
            return create_widget(
                value=bool(field.default), annotation=bool, name=field.name, label=label, options=options
            )
        if field.kind in ("int", "float") and not field.optional:
            low, high, step = setting_range(self.family, field)
            kind = int if field.kind == "int" else float
            options.update(min=kind(low), max=kind(high), step=kind(step))
            widget = create_widget(annotation=kind, name=field.name, label=label, options=options)
            if kind is float:  # enough decimals for the default before it is set (Qt rounds to them)
                decimals = max(widget.native.decimals(), _decimals(float(field.default or 0)))
                widget.native.setDecimals(decimals)
            widget.value = kind(field.default or 0)
            return widget
        widget = LineEdit(value=setting_text(field.default), name=field.name, label=label, **options)
        if field.default is None:
            default = paper_default(self.family, field.name).replace("``", "")
            widget.native.setPlaceholderText(f"default: {default}")
        return widget

    def widget(self, name: str) -> Any:
        """The magicgui widget of setting ``name`` (``.value`` reads and sets it)."""
        try:
            return self._widgets[name]
        except KeyError:
            raise KeyError(
                f"{self.family.name} has no setting {name!r} in the form ({', '.join(self._widgets)})"
            ) from None

    def values(self) -> dict[str, Any]:
        """Every setting of the form by name, as its kind (None: the family's default).

        Raises
        ------
        TrainingError
            Naming the setting whose text is not a value of its kind.
        """
        out: dict[str, Any] = {}
        for name, widget in self._widgets.items():
            field = self.fields[name]
            if isinstance(widget, LineEdit):
                out[name] = parse_setting(self.family, field, widget.value)
            else:
                out[name] = widget.value
        return out

    def close(self) -> None:
        """Drop the rows (the family changed)."""
        self.native.setParent(None)
        self.native.deleteLater()
