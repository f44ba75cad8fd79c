"""Nucleus kinds, per-kind shape parameters and their placement over the whole slide.

Nuclei are placed once per slide (jittered lattices and Poisson points in
micrometres) and labelled by the fields, so the CSV and the pixels agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from napari_pathology.slide.synthetic.fields import (
    _F_EPI,
    _F_FAT,
    _F_FIB0,
    _F_FIB2,
    _F_LOBULE,
    _F_LYMPH,
    _F_NEST,
    _F_TISSUE,
    _F_TUMOUR,
    _field_bbox,
    _Grid,
    _lattice,
)

#: Nucleus kinds of the ``kind`` column; ``tumour`` is tumour type A, ``tumour_b`` type B (appended
#: last so the codes of the others never change).
NUCLEUS_KINDS = ("tumour", "epithelial", "lymphocyte", "fibroblast", "histiocyte", "tumour_b")
_TUMOUR, _EPITHELIAL, _LYMPHOCYTE, _FIBROBLAST, _HISTIOCYTE, _TUMOUR_B = range(6)
#: The kinds that are tumour nuclei (label ``tumour`` in the nucleus table; purity counts them).
TUMOUR_KINDS = ("tumour", "tumour_b")
_TUMOUR_CODES = (_TUMOUR, _TUMOUR_B)


@dataclass
class _Nuclei:
    x_um: np.ndarray
    y_um: np.ndarray
    r_um: np.ndarray
    kind: np.ndarray
    aspect: np.ndarray
    angle: np.ndarray
    h3: np.ndarray  # cos(3 theta) amplitude
    g3: np.ndarray  # sin(3 theta) amplitude
    dark: np.ndarray
    coarse: np.ndarray
    rim: np.ndarray
    nucleolus: np.ndarray  # strength (0 = none)
    nu: np.ndarray
    nv: np.ndarray
    ns: np.ndarray

    def take(self, idx: np.ndarray) -> _Nuclei:
        return _Nuclei(**{k: getattr(self, k)[idx] for k in self.__dataclass_fields__})

    def __len__(self) -> int:
        return len(self.x_um)


def _poisson(
    rng: np.random.Generator, bbox: tuple[float, ...], per_mm2: float
) -> tuple[np.ndarray, np.ndarray]:
    x0, y0, x1, y1 = bbox
    n = int(rng.poisson(per_mm2 * (x1 - x0) * (y1 - y0) / 1e6))
    return rng.uniform(x0, x1, n), rng.uniform(y0, y1, n)


def _params(
    rng: np.random.Generator, kind: int, x: np.ndarray, y: np.ndarray, angle: np.ndarray | None
) -> dict[str, np.ndarray]:
    n = len(x)
    zeros = np.zeros(n)
    p: dict[str, np.ndarray] = {"x_um": x, "y_um": y, "kind": np.full(n, kind, np.int8)}
    if kind == _TUMOUR:
        r = np.exp(rng.normal(math.log(5.0), 0.2, n))
        p["r_um"] = np.clip(r, 3.2, 8.0)
        p["aspect"] = 1.0 + np.minimum(np.abs(rng.normal(0, 0.3, n)), 1.2)
        p["h3"] = rng.normal(0, 0.04, n)
        p["g3"] = rng.normal(0, 0.04, n)
        vesicular = rng.random(n) < 0.4
        p["dark"] = np.clip(rng.normal(1.4, 0.25, n), 0.8, 2.2) * np.where(vesicular, 0.7, 1.0)
        p["coarse"] = rng.uniform(0.55, 1.0, n)
        p["rim"] = np.where(vesicular, rng.uniform(0.35, 0.6, n), rng.uniform(0.0, 0.2, n))
        has_nucleolus = rng.random(n) < np.where(vesicular, 0.85, 0.3)
        p["nucleolus"] = np.where(has_nucleolus, rng.uniform(0.7, 1.3, n), 0.0)
        p["nu"] = rng.uniform(-0.3, 0.3, n) * p["r_um"]
        p["nv"] = rng.uniform(-0.3, 0.3, n) * p["r_um"]
        p["ns"] = rng.uniform(0.45, 0.8, n)
    elif kind == _TUMOUR_B:
        # Large pleomorphic vesicular nuclei: pale, chromatin at the membrane, one big nucleolus;
        # irregular outlines, a few bizarre giant ones.
        r = np.exp(rng.normal(math.log(6.6), 0.2, n)) * np.where(rng.random(n) < 0.06, 1.45, 1.0)
        p["r_um"] = np.clip(r, 4.2, 12.0)
        p["aspect"] = 1.0 + np.minimum(np.abs(rng.normal(0, 0.22, n)), 0.9)
        p["h3"] = rng.normal(0, 0.05, n)
        p["g3"] = rng.normal(0, 0.05, n)
        p["dark"] = np.clip(rng.normal(0.78, 0.14, n), 0.5, 1.2)
        p["coarse"] = rng.uniform(0.05, 0.3, n)
        p["rim"] = rng.uniform(0.6, 0.85, n)
        p["nucleolus"] = np.where(rng.random(n) < 0.92, rng.uniform(1.6, 2.4, n), 0.0)
        p["nu"] = rng.uniform(-0.25, 0.25, n) * p["r_um"]
        p["nv"] = rng.uniform(-0.25, 0.25, n) * p["r_um"]
        p["ns"] = rng.uniform(0.75, 1.1, n)
    else:
        if kind == _EPITHELIAL:
            reactive = rng.random(n) < 0.05
            r = np.where(reactive, rng.normal(3.9, 0.3, n), rng.normal(3.0, 0.3, n))
            p["r_um"] = np.clip(r, 2.3, 4.6)
            p["aspect"] = 1.0 + np.minimum(np.abs(rng.normal(0, 0.12, n)), 0.5)
            p["dark"] = np.clip(rng.normal(1.1, 0.15, n), 0.7, 1.6)
            p["coarse"] = rng.uniform(0.0, 0.3, n)
            p["rim"] = rng.uniform(0.0, 0.15, n)
            amp = 0.02
        elif kind == _LYMPHOCYTE:
            p["r_um"] = np.clip(rng.normal(2.55, 0.22, n), 2.0, 3.3)
            p["aspect"] = 1.0 + np.minimum(np.abs(rng.normal(0, 0.07, n)), 0.3)
            p["dark"] = np.clip(rng.normal(1.75, 0.2, n), 1.2, 2.4)
            p["coarse"] = rng.uniform(0.1, 0.4, n)
            p["rim"] = zeros
            amp = 0.02
        elif kind == _FIBROBLAST:
            p["r_um"] = np.clip(rng.normal(2.5, 0.3, n), 1.8, 3.4)
            p["aspect"] = rng.uniform(3.0, 6.0, n)
            p["dark"] = np.clip(rng.normal(1.25, 0.15, n), 0.8, 1.7)
            p["coarse"] = rng.uniform(0.0, 0.2, n)
            p["rim"] = zeros
            amp = 0.03
        else:  # histiocyte: large, pale, bean-shaped -- overlaps tumour in size
            p["r_um"] = np.clip(rng.normal(3.9, 0.45, n), 3.0, 5.2)
            p["aspect"] = rng.uniform(1.2, 1.8, n)
            p["dark"] = np.clip(rng.normal(0.85, 0.12, n), 0.55, 1.2)
            p["coarse"] = rng.uniform(0.1, 0.3, n)
            p["rim"] = rng.uniform(0.2, 0.4, n)
            amp = 0.09
        p["h3"] = rng.normal(0, amp, n)
        p["g3"] = rng.normal(0, amp, n)
        p["nucleolus"] = zeros
        p["nu"] = zeros
        p["nv"] = zeros
        p["ns"] = np.ones(n)
    p["angle"] = rng.uniform(0, np.pi, n) if angle is None else angle
    return p


def _place_nuclei(
    grid: _Grid,
    rng: np.random.Generator,
    fields: np.ndarray,
    fibre_angles: np.ndarray,
    lining_um: float,
    acini: np.ndarray,
    type_b_rng: np.random.Generator | None = None,
) -> _Nuclei:
    """All nuclei of the slide; with ``type_b_rng`` the tumour is type B, drawn from that generator.

    Type A's draws are made from ``rng`` either way, so everything outside the
    tumour is the same for types A and B of one seed.
    """
    tumour, nest, lymph, epi, fat = (
        fields[_F_TUMOUR],
        fields[_F_NEST],
        fields[_F_LYMPH],
        fields[_F_EPI],
        fields[_F_FAT],
    )
    stroma_grid = np.minimum(
        np.minimum(np.minimum(fields[_F_TISSUE], -tumour), -lymph),
        np.minimum(-epi, -fat),
    )
    groups: list[dict[str, np.ndarray]] = []

    def sample(values: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return grid.points(x, y, values)

    # Tumour: crowded, pleomorphic.
    bbox = _field_bbox(grid, tumour > 0, 20.0)
    if bbox is not None:
        x, y = _lattice(rng, bbox, 11.0, 0.33)
        keep = (sample(tumour, x, y) > 0) & (sample(nest, x, y) > 0) & (rng.random(len(x)) < 0.93)
        tumour_a = _params(rng, _TUMOUR, x[keep], y[keep], None)
        if type_b_rng is None:
            groups.append(tumour_a)
        else:  # solid sheets: the whole lesion, fewer but larger cells
            x, y = _lattice(type_b_rng, bbox, 17.5, 0.2)
            keep = (sample(tumour, x, y) > 1.0) & (type_b_rng.random(len(x)) < 0.96)
            groups.append(_params(type_b_rng, _TUMOUR_B, x[keep], y[keep], None))
    # Normal epithelium: small, round, evenly spaced.
    # Normal epithelium: a ring of basal nuclei around each gland lumen (solid when small).
    xs, ys = [], []
    for cx, cy, radius in acini:
        if radius - lining_um > 3.0:
            ring = radius - rng.uniform(3.5, 4.8)
            n = max(5, round(2 * math.pi * ring / rng.uniform(6.0, 7.2)))
            theta = (np.arange(n) + rng.uniform(-0.15, 0.15, n)) * (2 * math.pi / n)
            theta += rng.uniform(0, 2 * math.pi)
            rr = ring + rng.normal(0, 0.7, n)
            xs.append(cx + rr * np.cos(theta))
            ys.append(cy + rr * np.sin(theta))
        else:
            x, y = _lattice(rng, (cx - radius, cy - radius, cx + radius, cy + radius), 7.5, 0.2)
            inside = np.hypot(x - cx, y - cy) < radius - 3.0
            xs.append(x[inside])
            ys.append(y[inside])
    if xs:
        x, y = np.concatenate(xs), np.concatenate(ys)
        keep = (sample(epi, x, y) > 0.5) & (rng.random(len(x)) < 0.97)
        groups.append(_params(rng, _EPITHELIAL, x[keep], y[keep], None))
    # Lymphoid aggregates: dense small dark lymphocytes with a few histiocytes.
    bbox = _field_bbox(grid, lymph > 0, 20.0)
    if bbox is not None:
        x, y = _lattice(rng, bbox, 6.6, 0.25)
        keep = (sample(lymph, x, y) > 0) & (rng.random(len(x)) < 0.9)
        groups.append(_params(rng, _LYMPHOCYTE, x[keep], y[keep], None))
        x, y = _poisson(rng, bbox, 900.0)
        keep = sample(lymph, x, y) > 0
        groups.append(_params(rng, _HISTIOCYTE, x[keep], y[keep], None))
    # Lymphocytes thinning out around aggregates, at the invasive front and in lobules.
    halo = np.maximum(np.maximum(lymph + 45.0, 0.8 * (tumour + 50.0)), fields[_F_LOBULE] * 0.4)
    halo_ok = np.minimum(np.minimum(halo, stroma_grid), -np.maximum(lymph, tumour))
    bbox = _field_bbox(grid, halo_ok > 0, 0.0)
    if bbox is not None:
        x, y = _poisson(rng, bbox, 2500.0)
        h = sample(halo, x, y)
        keep = (sample(stroma_grid, x, y) > 1.0) & (rng.random(len(x)) < np.clip(h / 60.0, 0, 0.6))
        groups.append(_params(rng, _LYMPHOCYTE, x[keep], y[keep], None))
    # Stroma: sparse spindle fibroblasts, scattered lymphocytes and histiocytes.
    bbox = _field_bbox(grid, stroma_grid > 0, 20.0)
    if bbox is not None:
        x, y = _poisson(rng, bbox, 650.0)
        keep = sample(stroma_grid, x, y) > 1.0
        x, y = x[keep], y[keep]
        w = sample(fields[_F_FIB0 : _F_FIB2 + 1], x, y)
        ang = fibre_angles[np.argmax(w, axis=0)] + rng.normal(0, 0.15, len(x))
        groups.append(_params(rng, _FIBROBLAST, x, y, ang))
        for kind, density in ((_LYMPHOCYTE, 180.0), (_HISTIOCYTE, 60.0)):
            x, y = _poisson(rng, bbox, density)
            keep = sample(stroma_grid, x, y) > 1.0
            groups.append(_params(rng, kind, x[keep], y[keep], None))
    keys = [
        "x_um", "y_um", "r_um", "kind", "aspect", "angle", "h3", "g3",
        "dark", "coarse", "rim", "nucleolus", "nu", "nv", "ns",
    ]  # fmt: skip
    if not groups:
        return _Nuclei(**{k: np.zeros(0, np.int8 if k == "kind" else np.float32) for k in keys})
    merged = {k: np.concatenate([g[k] for g in groups]) for k in keys}
    # Keep only centres on the slide; sort by (y, x) for block look-ups and the CSV.
    inside = (
        (merged["x_um"] >= 0)
        & (merged["x_um"] < grid.width_um)
        & (merged["y_um"] >= 0)
        & (merged["y_um"] < grid.height_um)
    )
    order = np.lexsort((merged["x_um"][inside], merged["y_um"][inside]))
    out = {}
    for k in keys:
        arr = merged[k][inside][order]
        out[k] = arr if k in ("kind", "x_um", "y_um") else arr.astype(np.float32)
    return _Nuclei(**out)
