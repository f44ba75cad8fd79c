"""The :class:`NucleusPoints` table: one row per nucleus, its label, probability, area and source."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .labels import LABELS, SOURCES, UNLABELED, _codes, _parse_source, parse_label

if TYPE_CHECKING:
    from napari_pathology.nuclei.detect import NucleusTable


def _f64() -> np.ndarray:
    return np.zeros(0, np.float64)


def _f32() -> np.ndarray:
    return np.zeros(0, np.float32)


def _i8() -> np.ndarray:
    return np.zeros(0, np.int8)


_DTYPES = {
    "x_um": np.float64, "y_um": np.float64, "label": np.int8,
    "probability": np.float32, "area_um2": np.float32, "source": np.int8,
}  # fmt: skip


@dataclass(frozen=True, eq=False)
class NucleusPoints:
    """Nuclei as labelled points, one row per nucleus, coordinates in slide micrometres.

    Attributes
    ----------
    x_um, y_um : ndarray
        ``(N,)`` float64 centroids (level-0 frame, origin at the top-left corner); always
        finite (a table cannot hold, so no writer can write, an empty or NaN centroid).
    label : ndarray
        ``(N,)`` int8 codes into :data:`LABELS` (names are accepted and parsed).
    probability : ndarray
        ``(N,)`` float32 tumour probability, NaN where not classified.
    area_um2 : ndarray
        ``(N,)`` float32 nucleus area, NaN where unknown.
    source : ndarray
        ``(N,)`` int8 codes into :data:`SOURCES` (names are accepted).

    Examples
    --------
    >>> pts = NucleusPoints(np.array([1.0, 2.0, 3.0]), np.zeros(3), label=np.array([1, 2, 1]))
    >>> pts.counts()["tumour"], round(pts.purity(), 3)
    (2, 0.667)

    """

    x_um: np.ndarray = field(default_factory=_f64)
    y_um: np.ndarray = field(default_factory=_f64)
    label: np.ndarray | None = None
    probability: np.ndarray | None = None
    area_um2: np.ndarray | None = None
    source: np.ndarray | None = None

    def __post_init__(self) -> None:
        """Cast the columns, fill missing ones and check that all have one length."""
        x = np.asarray(self.x_um, np.float64).reshape(-1) if np.ndim(self.x_um) <= 1 else None
        if x is None:
            raise ValueError(f"x_um must be 1-D, got shape {np.shape(self.x_um)}")
        n = len(x)
        fill = {"label": UNLABELED, "probability": np.nan, "area_um2": np.nan, "source": 0}
        for name, dtype in _DTYPES.items():
            value = getattr(self, name)
            if value is None:
                arr = np.full(n, fill[name], dtype)
            else:
                raw = np.asarray(value)
                if raw.ndim > 1:
                    raise ValueError(f"column {name!r} must be 1-D, got shape {raw.shape}")
                if name in ("label", "source") and raw.dtype.kind in "USO":  # names, not codes
                    raw = _codes(
                        raw.reshape(-1).astype(str), parse_label if name == "label" else _parse_source
                    )
                arr = np.ascontiguousarray(raw.reshape(-1), dtype=dtype)
            if len(arr) != n:
                raise ValueError(f"column {name!r} has {len(arr)} rows but x_um has {n}; give equal lengths")
            object.__setattr__(self, name, arr)
        if n and not (np.isfinite(self.x_um).all() and np.isfinite(self.y_um).all()):
            bad = int(np.flatnonzero(~(np.isfinite(self.x_um) & np.isfinite(self.y_um)))[0])
            raise ValueError(
                f"nucleus {bad}: centroid ({float(self.x_um[bad])!r}, {float(self.y_um[bad])!r}) "
                "is not finite; every nucleus needs a finite x and y"
            )
        if n and (self.label.min() < 0 or self.label.max() >= len(LABELS)):
            raise ValueError(f"label codes must be 0-{len(LABELS) - 1} ({', '.join(LABELS)})")
        if n and (self.source.min() < 0 or self.source.max() >= len(SOURCES)):
            raise ValueError(f"source codes must be 0-{len(SOURCES) - 1} ({', '.join(SOURCES)})")

    # ------------------------------------------------------------------ construction
    def __len__(self) -> int:
        """Number of nuclei."""
        return int(self.x_um.shape[0])

    def __repr__(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts().items() if v and k != "total")
        return f"<NucleusPoints {len(self)} nuclei{': ' + counts if counts else ''}>"

    def xy_um(self) -> np.ndarray:
        """Centroids as an ``(N, 2)`` array of ``(x_um, y_um)``."""
        return np.column_stack([self.x_um, self.y_um]).reshape(-1, 2)

    @classmethod
    def empty(cls) -> NucleusPoints:
        """A table with no nuclei."""
        return cls()

    @classmethod
    def from_table(cls, table: NucleusTable, source: str = "detected") -> NucleusPoints:
        """Unlabeled, unclassified points from a detector's :class:`NucleusTable` (its area kept)."""
        code = _parse_source(source)
        return cls(table.x_um, table.y_um, area_um2=table.area_um2, source=np.full(len(table), code, np.int8))

    @classmethod
    def concat(cls, *parts: NucleusPoints) -> NucleusPoints:
        """Rows of several tables, in order (``concat(a, b)``; ``concat(*tables)`` for a list)."""
        if not parts:
            return cls()
        return cls(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in _DTYPES})

    def subset(self, index: np.ndarray | Sequence[int] | slice) -> NucleusPoints:
        """The rows selected by a boolean mask, integer indices or a slice (a copy)."""
        if not isinstance(index, slice):
            index = np.asarray(index)
            if index.dtype == bool and index.shape != (len(self),):
                raise ValueError(f"boolean mask has shape {index.shape}, expected ({len(self)},)")
        return NucleusPoints(**{name: getattr(self, name)[index].copy() for name in _DTYPES})

    def with_labels(self, index: np.ndarray | Sequence[int] | slice, label: str | int) -> NucleusPoints:
        """A copy with the rows in ``index`` (mask, indices or slice) set to ``label``."""
        code = parse_label(label)
        labels = self.label.copy()
        labels[index] = code
        return self._replace(label=labels)

    def with_probabilities(
        self, probability: np.ndarray, index: np.ndarray | Sequence[int] | slice | None = None
    ) -> NucleusPoints:
        """A copy with tumour probabilities set (all rows, or the rows in ``index``)."""
        values = self.probability.copy()
        values[slice(None) if index is None else index] = np.asarray(probability, np.float32)
        return self._replace(probability=values)

    def _replace(self, **columns: np.ndarray) -> NucleusPoints:
        data = {name: getattr(self, name) for name in _DTYPES}
        data.update(columns)
        return NucleusPoints(**data)

    # ------------------------------------------------------------------ summaries
    def counts(self) -> dict[str, int]:
        """Number of nuclei per label (all four labels) and ``total``."""
        per = np.bincount(self.label.astype(np.int64), minlength=len(LABELS))
        out = {name: int(per[i]) for i, name in enumerate(LABELS)}
        out["total"] = len(self)
        return out

    def purity(self) -> float | None:
        """Ground-truth purity tumour / (tumour + normal), None without tumour or normal labels."""
        return _purity(self.counts())

    def predicted_purity(self) -> float | None:
        """Mean tumour probability over classified nuclei (finite probability), None when none is."""
        p = self.probability[np.isfinite(self.probability)]
        return float(np.mean(p, dtype=np.float64)) if len(p) else None

    def label_names(self) -> np.ndarray:
        """Labels as text (``(N,)`` array of str)."""
        return np.asarray(LABELS)[self.label]

    def source_names(self) -> np.ndarray:
        """Sources as text (``(N,)`` array of str)."""
        return np.asarray(SOURCES)[self.source]


def _purity(counts: Mapping[str, int]) -> float | None:
    known = counts["tumour"] + counts["normal"]
    return counts["tumour"] / known if known else None
