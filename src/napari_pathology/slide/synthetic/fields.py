"""Smooth fields on the mask grid: tissue, tumour, lymphoid, epithelium, fat, pen, blur.

All regions are fields sampled on the mask grid (one node per mask pixel
centre) in approximately signed micrometres: positive inside. The same
bilinear interpolation is used for pixels, nucleus labels, masks and polygons.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage, sparse
from scipy.spatial import cKDTree

# Field channels on the mask grid.
_F_TISSUE, _F_TUMOUR, _F_NEST, _F_LYMPH, _F_EPI, _F_FAT, _F_LOBULE = range(7)
_F_FIB0, _F_FIB1, _F_FIB2, _F_THICK, _F_PEN, _F_BLUR = range(7, 13)
_N_FIELDS = 13


def _cubic_matrix(n_out: int, positions: np.ndarray, n_in: int) -> sparse.csr_matrix:
    """Sparse Catmull-Rom interpolation matrix (``n_out x n_in``), clamped at the edges."""
    base = np.floor(positions).astype(np.int64)
    t = positions - base
    t2, t3 = t * t, t * t * t
    weights = np.stack(
        [
            -0.5 * t3 + t2 - 0.5 * t,
            1.5 * t3 - 2.5 * t2 + 1.0,
            -1.5 * t3 + 2.0 * t2 + 0.5 * t,
            0.5 * t3 - 0.5 * t2,
        ],
        axis=1,
    )
    cols = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
    rows = np.repeat(np.arange(n_out), 4)
    return sparse.csr_matrix(
        (weights.ravel(), (rows, cols.ravel())), shape=(n_out, n_in)
    )  # duplicates are summed


class _Grid:
    """The mask grid: node ``(i, j)`` sits at level-0 ``((j + .5) * d, (i + .5) * d)``."""

    def __init__(self, width: int, height: int, mpp: float, d: int) -> None:
        self.width, self.height, self.mpp, self.d = width, height, mpp, d
        self.gw = max(2, math.ceil(width / d))
        self.gh = max(2, math.ceil(height / d))
        self.step_um = d * mpp
        self.x_um = (np.arange(self.gw) + 0.5) * self.step_um
        self.y_um = (np.arange(self.gh) + 0.5) * self.step_um
        self.width_um = width * mpp
        self.height_um = height * mpp

    @property
    def shape(self) -> tuple[int, int]:
        return (self.gh, self.gw)

    def noise(self, rng: np.random.Generator, sigma_um: float) -> np.ndarray:
        """Gaussian-correlated noise (zero mean, unit std) with scale ``sigma_um``."""
        step = self.step_um
        coarse = max(sigma_um / 3.0, step)
        if coarse <= 1.5 * step:
            white = rng.standard_normal(self.shape)
            out = ndimage.gaussian_filter(white, sigma_um / step, mode="reflect")
        else:
            margin = 8
            nh = math.ceil(self.height_um / coarse) + 2 * margin
            nw = math.ceil(self.width_um / coarse) + 2 * margin
            white = rng.standard_normal((nh, nw))
            smooth = ndimage.gaussian_filter(white, sigma_um / coarse, mode="wrap")
            my = _cubic_matrix(self.gh, self.y_um / coarse + margin, nh)
            mx = _cubic_matrix(self.gw, self.x_um / coarse + margin, nw)
            out = np.asarray((mx @ (my @ smooth).T).T)
        out = out - out.mean()
        std = out.std()
        return (out / std if std > 0 else out).astype(np.float64)

    def points(self, x_um: np.ndarray, y_um: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Bilinear interpolation of grid ``values`` (``(..., gh, gw)``) at points in um."""
        u = np.clip(np.asarray(x_um, np.float64) / self.step_um - 0.5, 0, self.gw - 1)
        v = np.clip(np.asarray(y_um, np.float64) / self.step_um - 0.5, 0, self.gh - 1)
        j0 = np.minimum(np.floor(u).astype(np.int64), self.gw - 2)
        i0 = np.minimum(np.floor(v).astype(np.int64), self.gh - 2)
        wx = u - j0
        wy = v - i0
        f00 = values[..., i0, j0]
        f01 = values[..., i0, j0 + 1]
        f10 = values[..., i0 + 1, j0]
        f11 = values[..., i0 + 1, j0 + 1]
        top = f00 + (f01 - f00) * wx
        bottom = f10 + (f11 - f10) * wx
        return top + (bottom - top) * wy

    def axis(self, start: int, stop: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Lower node index and weight for level-0 pixel centres ``start..stop-1``."""
        u = np.clip((np.arange(start, stop, dtype=np.float64) + 0.5) / self.d - 0.5, 0, n - 1)
        i0 = np.minimum(np.floor(u).astype(np.int64), n - 2)
        return i0, (u - i0).astype(np.float32)


def _signed_distance(f: np.ndarray, step_um: float, clip_um: float = 400.0) -> np.ndarray:
    """Rescale a field by its gradient so that it approximates signed distance (um)."""
    gy, gx = np.gradient(f, step_um)
    grad = np.hypot(gx, gy)
    floor = max(1e-9, 0.05 * float(np.median(grad)))
    return np.clip(f / np.maximum(grad, floor), -clip_um, clip_um)


def _star_blob(
    grid: _Grid,
    rng: np.random.Generator,
    cx: float,
    cy: float,
    radius: float,
    aspect: float,
    harmonics: float,
    full: bool = False,
) -> np.ndarray:
    """Distance-like field (um) of an irregular elliptical blob: positive inside.

    Unless ``full``, only a generous bounding box is evaluated; elsewhere the
    field is a large negative constant.
    """
    angle = rng.uniform(0, np.pi)
    amps = [rng.normal(0, harmonics / k) for k in range(2, 6)]
    phases = [rng.uniform(0, 2 * np.pi) for _ in range(2, 6)]
    out = np.full(grid.shape, -3.0 * radius - 10 * grid.step_um)
    rows, cols = slice(None), slice(None)
    if not full:
        extent = radius * (1 + sum(abs(a) for a in amps)) * math.sqrt(aspect)
        extent += 0.8 * radius + 3 * grid.step_um
        s = grid.step_um
        rows = slice(max(0, int((cy - extent) / s)), max(0, int((cy + extent) / s) + 2))
        cols = slice(max(0, int((cx - extent) / s)), max(0, int((cx + extent) / s) + 2))
    dx = grid.x_um[cols][None, :] - cx
    dy = grid.y_um[rows][:, None] - cy
    ca, sa = math.cos(angle), math.sin(angle)
    u = (dx * ca + dy * sa) / math.sqrt(aspect)
    v = (-dx * sa + dy * ca) * math.sqrt(aspect)
    dist = np.hypot(u, v)
    theta = np.arctan2(v, u)
    r = np.ones_like(theta)
    for k, amp, phase in zip(range(2, 6), amps, phases, strict=True):
        r += amp * np.cos(k * theta - phase)
    out[rows, cols] = radius * np.clip(r, 0.4, None) - dist
    return out


def _tissue_field(grid: _Grid, rng: np.random.Generator, coverage: float) -> np.ndarray:
    w_um, h_um = grid.width_um, grid.height_um
    side = min(w_um, h_um)
    n_islands = int(rng.integers(2, 6))
    base_r = math.sqrt(coverage * w_um * h_um / (n_islands * math.pi))
    centres: list[tuple[float, float]] = []
    for _ in range(200):
        if len(centres) == n_islands:
            break
        c = (rng.uniform(0.18, 0.82) * w_um, rng.uniform(0.18, 0.82) * h_um)
        if all(math.hypot(c[0] - p[0], c[1] - p[1]) > 1.2 * base_r for p in centres):
            centres.append(c)
    if not centres:
        centres.append((0.5 * w_um, 0.5 * h_um))
    f = np.full(grid.shape, -np.inf)
    for cx, cy in centres:
        radius = base_r * rng.uniform(0.75, 1.25)
        blob = _star_blob(grid, rng, cx, cy, radius, rng.uniform(1.0, 1.8), 0.35, full=True)
        f = np.maximum(f, blob)
    if len(centres) > 1:  # keep islands apart: carve a channel along Voronoi edges
        d = np.sort(
            np.stack([np.hypot(grid.x_um[None, :] - cx, grid.y_um[:, None] - cy) for cx, cy in centres]),
            axis=0,
        )
        wobble = 0.06 * side * grid.noise(rng, 0.06 * side)
        gap = np.clip(1.0 - (d[1] - d[0] + wobble) / (0.15 * side), 0.0, 1.0)
        f = f - 0.35 * side * gap**2
    f = f + 0.10 * side * grid.noise(rng, 0.07 * side)
    f = f + 20.0 * grid.noise(rng, 40.0) + 5.0 * grid.noise(rng, 12.0)
    border = np.minimum.outer(
        np.minimum(grid.y_um, h_um - grid.y_um), np.minimum(grid.x_um, w_um - grid.x_um)
    )
    near_edge = np.clip(1.0 - border / (0.1 * side), 0.0, 1.0)
    f = f - 0.6 * side * near_edge**2
    f = f - np.quantile(f, 1.0 - coverage)
    return _signed_distance(f, grid.step_um)


def _pick_inside(
    rng: np.random.Generator, grid: _Grid, allowed: np.ndarray, fallback: np.ndarray
) -> tuple[float, float]:
    """A random node position (um) where ``allowed`` is set (else the best fallback)."""
    idx = np.flatnonzero(allowed)
    k = int(rng.choice(idx)) if len(idx) else int(np.argmax(fallback))
    i, j = divmod(k, grid.gw)
    return float(grid.x_um[j]), float(grid.y_um[i])


def _tumour_field(
    grid: _Grid,
    rng: np.random.Generator,
    tissue: np.ndarray,
    depth: np.ndarray,
    negative: bool,
    tumour_size: str,
) -> tuple[np.ndarray, list[dict[str, float]]]:
    if negative:
        return np.full(grid.shape, -400.0), []
    side = min(grid.width_um, grid.height_um)
    if tumour_size == "micro":
        n = 1
        d_max = min(600.0, 0.3 * side)
        d_min = min(200.0, 0.6 * d_max)
    else:
        n = int(rng.integers(1, 4))
        n = min(n, 1 + int(side >= 3000.0) + int(side >= 6000.0))
        d_max = min(3000.0, 0.4 * side)
        d_min = min(500.0, 0.6 * d_max)
    cell_area = grid.step_um**2
    lesions: list[dict[str, float]] = []
    out = np.full(grid.shape, -400.0)
    for _ in range(n):
        diameter = float(rng.uniform(d_min, d_max))
        best: tuple[float, np.ndarray, float, float] | None = None
        for _attempt in range(12):
            deep = depth > min(0.45 * diameter, 0.7 * float(depth.max()))
            cx, cy = _pick_inside(rng, grid, deep & (out < -0.3 * diameter), depth)
            blob = _star_blob(grid, rng, cx, cy, diameter / 2, rng.uniform(1.0, 1.6), 0.3)
            blob = blob + 0.07 * diameter * grid.noise(rng, 0.12 * diameter)
            blob = blob + 6.0 * grid.noise(rng, 14.0)
            clipped = np.minimum(blob, tissue)
            area = float((clipped > 0).sum()) * cell_area
            if best is None or area > best[0]:
                best = (area, clipped, cx, cy)
            if area > 0.45 * math.pi * diameter**2 / 4:
                break
        assert best is not None
        area, clipped, cx, cy = best
        if area <= 0:
            continue
        out = np.maximum(out, clipped)
        lesions.append({"x_um": cx, "y_um": cy, "diameter_um": diameter, "area_um2_approx": area})
    if not np.any(out > 0):  # always leave visible tumour on a positive slide
        cx, cy = _pick_inside(rng, grid, depth >= depth.max() * 0.9, depth)
        r = max(0.5 * float(depth.max()), 2 * grid.step_um)
        blob = _star_blob(grid, rng, cx, cy, r, 1.0, 0.1)
        out = np.minimum(blob, tissue)
        lesions.append({"x_um": cx, "y_um": cy, "diameter_um": 2 * r, "area_um2_approx": 0.0})
    return _signed_distance(out, grid.step_um), lesions


def _build_fields(
    grid: _Grid,
    rng: np.random.Generator,
    negative: bool,
    tumour_size: str,
    pen_mark: bool,
    blurred_patch: bool,
) -> tuple[np.ndarray, dict[str, Any]]:
    info: dict[str, Any] = {}
    step = grid.step_um
    side = min(grid.width_um, grid.height_um)
    coverage = float(rng.uniform(0.42, 0.56))
    tissue = _tissue_field(grid, rng, coverage)
    depth = ndimage.distance_transform_edt(tissue > 0) * step  # um from the tissue edge
    tumour, lesions = _tumour_field(grid, rng, tissue, depth, negative, tumour_size)
    info["lesions"] = lesions

    # Nests of tumour cells separated by thin desmoplastic septa (inside the lesion).
    nest_noise = grid.noise(rng, 22.0)
    nest = _signed_distance(nest_noise - np.quantile(nest_noise, 0.2), step, 100.0)

    in_tissue = tissue > 0
    tissue_area_mm2 = float(in_tissue.sum()) * step * step / 1e6
    # Lymphoid aggregates (dense, small, dark nuclei: a distractor).
    n_lymph = int(np.clip(round(tissue_area_mm2 / 3.5 * rng.uniform(0.7, 1.3)), 1, 20))
    lymph = np.full(grid.shape, -400.0)
    for _ in range(n_lymph):
        diameter = float(rng.uniform(160.0, 480.0)) * min(1.0, side / 2500.0 + 0.2)
        ok = (depth > 0.6 * diameter) & (tumour < -0.6 * diameter)
        cx, cy = _pick_inside(rng, grid, ok, depth - np.maximum(tumour, 0) * 4)
        blob = _star_blob(grid, rng, cx, cy, diameter / 2, rng.uniform(1.0, 1.5), 0.3)
        lymph = np.maximum(lymph, blob + 0.08 * diameter * grid.noise(rng, 0.15 * diameter))
    lymph = np.minimum(np.minimum(_signed_distance(lymph, step), tissue), -tumour)

    # Normal epithelium: lobules of small glands (acini) lined by small round nuclei
    # around a lumen, and some solid nests.
    lob_noise = grid.noise(rng, 110.0) + 0.5 * grid.noise(rng, 300.0)
    frac = float(rng.uniform(0.2, 0.32))
    thr = np.quantile(lob_noise[in_tissue], 1 - frac) if in_tissue.any() else 0.0
    lobule = _signed_distance(lob_noise - thr, step, 200.0)
    lining = float(rng.uniform(9.0, 12.0))
    acini, centres = _acini_field(grid, rng, lobule, tissue, tumour, lymph)
    epi = np.minimum(np.minimum(np.minimum(acini, tissue), -tumour), -lymph)
    info["gland_lining_um"] = lining
    info["acini"] = centres
    fat_noise = grid.noise(rng, 160.0)
    frac = float(rng.uniform(0.04, 0.12))
    thr = np.quantile(fat_noise[in_tissue], 1 - frac) if in_tissue.any() else 0.0
    fat = _signed_distance(fat_noise - thr, step, 200.0)
    fat = np.minimum(np.minimum(np.minimum(np.minimum(fat, tissue), -tumour), -lymph), -epi)

    # Fibre orientation blend and section thickness.
    logits = np.stack([grid.noise(rng, 140.0) for _ in range(3)])
    logits = 4.0 * logits
    weights = np.exp(logits - logits.max(axis=0))
    weights /= weights.sum(axis=0)
    thick = 1.0 + 0.07 * grid.noise(rng, 500.0) + 0.035 * grid.noise(rng, 60.0)

    pen = np.full(grid.shape, -400.0)
    if pen_mark:
        pen, info["pen_mark"] = _pen_field(grid, rng)
    blur = np.zeros(grid.shape)
    if blurred_patch:
        blur, info["blurred_patch"] = _blur_field(grid, rng, depth)

    fields = np.stack([tissue, tumour, nest, lymph, epi, fat, lobule, *weights, thick, pen, blur]).astype(
        np.float32
    )
    info["coverage_target"] = coverage
    return fields, info


def _acini_field(
    grid: _Grid,
    rng: np.random.Generator,
    lobule: np.ndarray,
    tissue: np.ndarray,
    tumour: np.ndarray,
    lymph: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Small round glands clustered in lobules: field ``R - distance`` (um) and centres."""
    field_ = np.full(grid.shape, -200.0)
    ok = (lobule > 0) & (tissue > 25.0) & (tumour < -25.0) & (lymph < -10.0)
    bbox = _field_bbox(grid, ok, 0.0)
    if bbox is None:
        return field_, np.zeros((0, 3))
    spacing = float(rng.uniform(40.0, 54.0))
    x, y = _lattice(rng, bbox, spacing, 0.3)
    keep = grid.points(x, y, np.where(ok, 1.0, 0.0)) > 0.99
    x, y = x[keep], y[keep]
    keep = rng.random(len(x)) < 0.85
    x, y = x[keep], y[keep]
    if not len(x):
        return field_, np.zeros((0, 3))
    radius = np.minimum(rng.uniform(11.0, 26.0, len(x)), 0.47 * spacing)
    duct = rng.random(len(x)) < 0.04
    radius = np.where(duct, radius * 1.6, radius)
    tree = cKDTree(np.stack([x, y], 1))
    gx, gy = np.meshgrid(grid.x_um, grid.y_um)
    near = grid.points(gx, gy, np.where(ok, 1.0, 0.0)) > 0  # only near lobules
    near = ndimage.binary_dilation(near, iterations=max(1, math.ceil(60.0 / grid.step_um)))
    pts = np.stack([gx[near], gy[near]], 1)
    k = min(3, len(x))
    dist, idx = tree.query(pts, k=k)
    dist = dist.reshape(len(pts), k)
    idx = idx.reshape(len(pts), k)
    field_[near] = np.max(radius[idx] - dist, axis=1)
    return field_, np.stack([x, y, radius], 1)


def _pen_field(grid: _Grid, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Signed distance (um) to a thick, slightly wavy marker stroke."""
    w_um, h_um = grid.width_um, grid.height_um
    side = min(w_um, h_um)
    p0 = np.array([rng.uniform(0.05, 0.4) * w_um, rng.uniform(0.05, 0.95) * h_um])
    p3 = np.array([rng.uniform(0.6, 0.95) * w_um, rng.uniform(0.05, 0.95) * h_um])
    if rng.random() < 0.5:
        p0, p3 = p0[::-1] * [w_um / h_um, h_um / w_um], p3[::-1] * [w_um / h_um, h_um / w_um]
    p1 = p0 + (p3 - p0) / 3 + rng.normal(0, 0.12 * side, 2)
    p2 = p0 + 2 * (p3 - p0) / 3 + rng.normal(0, 0.12 * side, 2)
    t = np.linspace(0, 1, 2000)[:, None]
    curve = (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3
    length = rng.uniform(0.4, 0.8)
    start = rng.uniform(0, 1 - length)
    keep = (t[:, 0] >= start) & (t[:, 0] <= start + length)
    curve, tt = curve[keep], (t[keep, 0] - start) / length
    half_w = max(40.0, 0.018 * side) * rng.uniform(0.8, 1.3)
    width_var = half_w * (1.0 - 0.35 * np.abs(2 * tt - 1) ** 3)
    reach = 2.0 * half_w + 4 * grid.step_um
    (x0, y0), (x1, y1) = curve.min(axis=0) - reach, curve.max(axis=0) + reach
    cols = (grid.x_um >= x0) & (grid.x_um <= x1)
    rows = (grid.y_um >= y0) & (grid.y_um <= y1)
    gx, gy = np.meshgrid(grid.x_um[cols], grid.y_um[rows])
    tree = cKDTree(curve)
    dist, idx = tree.query(np.stack([gx.ravel(), gy.ravel()], 1), distance_upper_bound=reach)
    far = idx >= len(curve)
    near_field = np.where(far, -reach, width_var[np.minimum(idx, len(curve) - 1)] - dist)
    field_ = np.full(grid.shape, -reach)
    field_[np.ix_(rows, cols)] = near_field.reshape(gx.shape)
    field_ = field_ + 0.08 * half_w * grid.noise(rng, 30.0)
    colour = "green" if rng.random() < 0.5 else "blue"
    info = {"colour": colour, "half_width_um": half_w, "start_um": curve[0].tolist()}
    info["end_um"] = curve[-1].tolist()
    return field_, info


def _blur_field(
    grid: _Grid, rng: np.random.Generator, depth: np.ndarray
) -> tuple[np.ndarray, dict[str, Any]]:
    """Weight in [0, 1] of an out-of-focus patch over tissue."""
    side = min(grid.width_um, grid.height_um)
    diameter = float(rng.uniform(0.18, 0.32) * side)
    cx, cy = _pick_inside(rng, grid, depth > 0.2 * diameter, depth)
    blob = _star_blob(grid, rng, cx, cy, diameter / 2, rng.uniform(1.0, 1.5), 0.2)
    weight = np.clip(blob / (0.25 * diameter), 0.0, 1.0)
    weight = weight * weight * (3 - 2 * weight)
    return weight, {"x_um": cx, "y_um": cy, "diameter_um": diameter}


def _field_bbox(grid: _Grid, positive: np.ndarray, margin_um: float) -> tuple[float, ...] | None:
    rows = np.flatnonzero(positive.any(axis=1))
    cols = np.flatnonzero(positive.any(axis=0))
    if not len(rows):
        return None
    s = grid.step_um
    return (
        max(0.0, cols[0] * s - margin_um),
        max(0.0, rows[0] * s - margin_um),
        min(grid.width_um, (cols[-1] + 1) * s + margin_um),
        min(grid.height_um, (rows[-1] + 1) * s + margin_um),
    )


def _lattice(
    rng: np.random.Generator, bbox: tuple[float, ...], spacing: float, jitter: float
) -> tuple[np.ndarray, np.ndarray]:
    x0, y0, x1, y1 = bbox
    ys = np.arange(y0, y1, spacing * 0.8660254)
    xs = np.arange(x0, x1, spacing)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    xx = xx + (np.arange(len(ys)) % 2)[:, None] * (spacing / 2)
    xx = xx.ravel() + rng.uniform(-jitter, jitter, xx.size) * spacing
    yy = yy.ravel() + rng.uniform(-jitter, jitter, yy.size) * spacing
    return xx, yy
