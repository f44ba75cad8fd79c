"""Procedurally generated H&E-like whole-slide images with exact ground truth.

:func:`generate_synthetic_slide` writes a pyramidal, tiled, JPEG-compressed
TIFF that OpenSlide opens as ``generic-tiff`` (level 0 first, then each 2x
reduced level as its own top-level page), plus sidecar files with the ground
truth beside it (for ``OUT.tif``):

``OUT.truth.json``
    Label, geometry, counts and generator options.
``OUT.tumour.geojson``
    QuPath-style tumour annotations in level-0 pixel coordinates.
``OUT.tissue.png`` / ``OUT.tumour.png``
    Boolean masks (0/255) at ``mask_mpp`` um/px.
``OUT.nuclei.csv``
    Every rendered nucleus: ``x_um,y_um,label,radius_um,kind``.

How it works
------------
All regions (tissue, tumour, lymphoid aggregates, epithelium, fat, pen ink,
out-of-focus patch) are smooth fields sampled on the mask grid (one node per
mask pixel centre) in approximately signed micrometres. The same bilinear
interpolation of these fields is used to colour pixels, to label nuclei, to
write the PNG masks (the field at the nodes) and to trace the polygons (the
zero contour), so all ground truth agrees. Nuclei are placed once for the
whole slide (jittered lattices and Poisson points in micrometres) and splatted
per block, fibre and chromatin textures are periodic and sampled by global
pixel coordinates, so blocks rendered in any order by any thread are seamless
and the output is deterministic for a given set of arguments.

Colour follows Beer-Lambert: ``RGB = 255 * exp(-(H * h + E * e + ...))`` with
per-slide random stain vectors and intensities.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import tifffile
from PIL import Image
from scipy import fft as sp_fft
from scipy import ndimage, sparse
from scipy.spatial import cKDTree

from napari_pathology.fileio import (
    atomic_path,
    atomic_write,
    ensure_writable_dir,
    output_error,
    read_json_file,
)
from napari_pathology.geometry import field_to_polygons, polygon_area, polygons_to_geojson
from napari_pathology.progress import Progress, run_to_completion

__all__ = [
    "GENERATOR",
    "NUCLEUS_KINDS",
    "SyntheticTruth",
    "generate_synthetic_slide",
    "load_truth",
    "truth_paths",
    "write_synthetic_slide",
]

GENERATOR = "napari-pathology synthetic v1"
NUCLEUS_KINDS = ("tumour", "epithelial", "lymphocyte", "fibroblast", "histiocyte")
_TUMOUR, _EPITHELIAL, _LYMPHOCYTE, _FIBROBLAST, _HISTIOCYTE = range(5)

_SUFFIXES = {
    "truth_json": ".truth.json",
    "tumour_geojson": ".tumour.geojson",
    "tissue_png": ".tissue.png",
    "tumour_png": ".tumour.png",
    "nuclei_csv": ".nuclei.csv",
}

# Field channels on the mask grid.
_F_TISSUE, _F_TUMOUR, _F_NEST, _F_LYMPH, _F_EPI, _F_FAT, _F_LOBULE = range(7)
_F_FIB0, _F_FIB1, _F_FIB2, _F_THICK, _F_PEN, _F_BLUR = range(7, 13)
_N_FIELDS = 13

_BLOCK = 1024  # level-0 render block (px), a multiple of the tile size
_STAMP_CHUNK = 800_000  # max stamp elements rendered at once


@dataclass(frozen=True)
class SyntheticTruth:
    """Paths and facts of a written synthetic slide.

    Attributes
    ----------
    slide_path, truth_json, tumour_geojson, tissue_png, tumour_png, nuclei_csv : Path
        The slide and its sidecar files.
    label : str
        ``"tumour"`` or ``"normal"``.
    mpp : float
        Level-0 micrometres per pixel.
    width, height : int
        Level-0 size in pixels.
    tumour_area_um2 : float
        Area of the tumour polygons in square micrometres.
    mask_mpp : float
        Micrometres per pixel of the PNG masks.
    n_nuclei : int
        Number of rendered nuclei (rows of the CSV).

    """

    slide_path: Path
    truth_json: Path
    tumour_geojson: Path
    tissue_png: Path
    tumour_png: Path
    nuclei_csv: Path
    label: str
    mpp: float
    width: int
    height: int
    tumour_area_um2: float
    mask_mpp: float
    n_nuclei: int


def truth_paths(slide_path: str | os.PathLike[str]) -> dict[str, Path]:
    """Sidecar ground-truth paths for a slide (same stem, same folder).

    Parameters
    ----------
    slide_path : path-like
        The slide, e.g. ``OUT.tif``.

    Returns
    -------
    dict of str to Path
        ``slide_path`` (the slide itself) and the sidecars ``truth_json``,
        ``tumour_geojson``, ``tissue_png``, ``tumour_png`` and ``nuclei_csv``
        (e.g. ``OUT.truth.json``); the keys match :class:`SyntheticTruth`.

    """
    slide = Path(slide_path)
    stem = slide.with_suffix("")
    paths = {"slide_path": slide}
    paths.update({key: stem.with_name(stem.name + suffix) for key, suffix in _SUFFIXES.items()})
    return paths


def load_truth(slide_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the ``OUT.truth.json`` written beside a synthetic slide.

    Parameters
    ----------
    slide_path : path-like
        The slide (or the truth JSON itself).

    Returns
    -------
    dict
        The parsed JSON.

    """
    path = Path(slide_path)
    if not path.name.endswith(_SUFFIXES["truth_json"]):
        path = truth_paths(path)["truth_json"]
    return read_json_file(path, "synthetic truth file")


# --------------------------------------------------------------------------------------
# Smooth fields on the mask grid
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Periodic textures
# --------------------------------------------------------------------------------------


def _even(n: float, lo: int = 64, hi: int = 2304) -> int:
    return int(min(hi, max(lo, 2 * round(n / 2))))


def _bandpass_texture(
    rng: np.random.Generator,
    size: int,
    mpp: float,
    freq: float,
    bandwidth: float,
    angle: float | None = None,
    along: float = 0.0,
    extra: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Periodic band-pass noise (unit std); oriented along ``angle`` when given.

    ``extra = (weight, freq, bandwidth, along)`` adds a second oriented band (same
    angle) with the given relative amplitude.
    """
    white = rng.standard_normal((size, size)).astype(np.float32)
    ky = np.fft.fftfreq(size, d=mpp).astype(np.float32)[:, None]
    kx = np.fft.rfftfreq(size, d=mpp).astype(np.float32)[None, :]
    if angle is None:
        k = np.hypot(kx, ky)
        filt = np.exp(-0.5 * ((k - freq) / bandwidth) ** 2)
    else:
        ca, sa = math.cos(angle), math.sin(angle)
        k_par = kx * ca + ky * sa
        k_perp = np.abs(-kx * sa + ky * ca)

        def band(f: float, bw: float, al: float) -> np.ndarray:
            b = np.exp(-0.5 * (k_par / al) ** 2) * np.exp(-0.5 * ((k_perp - f) / bw) ** 2)
            return b / np.sqrt(np.sum(b * b))

        filt = band(freq, bandwidth, along)
        if extra is not None:
            filt += extra[0] * band(*extra[1:])
    filt[0, 0] = 0.0
    spec = sp_fft.rfft2(white)
    spec *= filt
    out = sp_fft.irfft2(spec, s=(size, size))
    std = float(out.std())
    return (out / std if std > 0 else out).astype(np.float32)


def _warp_periodic(
    rng: np.random.Generator, tex: np.ndarray, mpp: float, angle: float, amp_um: float
) -> np.ndarray:
    """Crimp a periodic fibre texture by a smooth periodic displacement across the fibres."""
    size = tex.shape[0]
    disp = _bandpass_texture(rng, size, mpp, 0.0, 1.0 / 45.0) * (amp_um / mpp)
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    coords = [rows + disp * math.cos(angle), cols - disp * math.sin(angle)]
    return ndimage.map_coordinates(tex, coords, order=1, mode="grid-wrap").astype(np.float32)


def _fat_texture(rng: np.random.Generator, size: int, mpp: float) -> np.ndarray:
    """Periodic adipocyte membranes (1 on membranes, 0 inside cells)."""
    low_mpp = 1.0
    n_low = max(32, round(size * mpp / low_mpp))
    period = n_low * low_mpp
    cell = rng.uniform(45.0, 65.0)
    n = max(2, round(period / cell))
    gx, gy = np.meshgrid(np.arange(n), np.arange(n))
    seeds = (np.stack([gx.ravel(), gy.ravel()], 1) + rng.uniform(0.1, 0.9, (n * n, 2))) * (period / n)
    tiled = np.concatenate([seeds + np.array([ox, oy]) * period for ox in (-1, 0, 1) for oy in (-1, 0, 1)])
    coords = (np.arange(n_low) + 0.5) * low_mpp
    px, py = np.meshgrid(coords, coords)
    # Curved walls: warp the sampling positions by smooth periodic noise.
    px = px + 3.0 * _bandpass_texture(rng, n_low, low_mpp, 0.0, 1.0 / 30.0)
    py = py + 3.0 * _bandpass_texture(rng, n_low, low_mpp, 0.0, 1.0 / 30.0)
    dist, _ = cKDTree(tiled).query(np.stack([px.ravel(), py.ravel()], 1), k=2)
    gap = (dist[:, 1] - dist[:, 0]).reshape(n_low, n_low)
    zoom = size / n_low
    gap = ndimage.zoom(gap, zoom, order=1, mode="grid-wrap", grid_mode=True)[:size, :size]
    width = 1.6 + 0.5 * rng.random()
    return np.exp(-((gap / width) ** 2)).astype(np.float32)


def _take2d(tex: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Sample a periodic texture over level-0 rows ``r0:r1`` and columns ``c0:c1``."""
    rows = np.arange(r0, r1) % tex.shape[0]
    cols = np.arange(c0, c1) % tex.shape[1]
    return tex.take(rows, axis=0).take(cols, axis=1)


# --------------------------------------------------------------------------------------
# Scene: everything a block renderer needs (immutable once built)
# --------------------------------------------------------------------------------------


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


@dataclass
class _Scene:
    width: int
    height: int
    mpp: float
    grid: _Grid
    fields: np.ndarray  # (_N_FIELDS, gh, gw) float32
    nuclei: _Nuclei
    x_px: np.ndarray  # nucleus centres, sorted by y
    y_px: np.ndarray
    half: np.ndarray  # stamp half size (px) per nucleus
    max_half: int
    h_vec: np.ndarray
    e_vec: np.ndarray
    bg_od: np.ndarray
    pen_od: np.ndarray
    fibres: list[np.ndarray]
    chrom_coarse: np.ndarray
    chrom_fine: np.ndarray
    mottle: np.ndarray
    fat: np.ndarray
    bg_noise: np.ndarray
    stroma_e: float
    gland_lining_um: float
    has_pen: bool
    has_blur: bool
    blur_sigma_px: float
    blur_margin: int
    info: dict[str, Any] = field(default_factory=dict)


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


# --------------------------------------------------------------------------------------
# Nuclei placement
# --------------------------------------------------------------------------------------


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
) -> _Nuclei:
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
        groups.append(_params(rng, _TUMOUR, x[keep], y[keep], None))
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


# --------------------------------------------------------------------------------------
# Scene construction
# --------------------------------------------------------------------------------------


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def _mask_downsample(width: int, height: int) -> int:
    d = 16
    while max(width, height) / d > 2048:
        d *= 2
    return d


def _build_scene(
    width: int,
    height: int,
    mpp: float,
    seed: int,
    negative: bool,
    tumour_size: str,
    pen_mark: bool,
    blurred_patch: bool,
) -> _Scene:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED, 1]))
    grid = _Grid(width, height, mpp, _mask_downsample(width, height))
    fields, info = _build_fields(grid, rng, negative, tumour_size, pen_mark, blurred_patch)

    # Stains (per-slide variation).
    h_vec = _unit(np.array([0.65, 0.70, 0.29]) + rng.normal(0, 0.035, 3))
    e_vec = _unit(np.array([0.14, 0.84, 0.52]) + rng.normal(0, 0.035, 3))
    h_scale = float(rng.uniform(0.85, 1.2))
    e_scale = float(rng.uniform(0.8, 1.2))
    bg_od = (np.array([0.035, 0.042, 0.03]) * rng.uniform(0.6, 1.4)).astype(np.float32)
    info["stain"] = {
        "h_vector": h_vec.tolist(),
        "e_vector": e_vec.tolist(),
        "h_scale": h_scale,
        "e_scale": e_scale,
    }

    # Periodic textures (sizes in px at this mpp, features in um).
    base_angle = rng.uniform(0, np.pi)
    fibre_angles = np.array([base_angle + k * np.pi / 3 for k in range(3)])
    big = _even(max(width, height), 64, 2304)  # no texture period beyond the slide
    fibres = []
    for k, period_um in enumerate((470.0, 530.0, 590.0)):
        size = _even(period_um / mpp, hi=big)
        extra = (0.35, 0.3, 0.12, 0.03)  # fine fibrils on top of the bundles
        tex = _bandpass_texture(rng, size, mpp, 0.07, 0.05, fibre_angles[k], 0.012, extra)
        fibres.append(_warp_periodic(rng, tex, mpp, fibre_angles[k], rng.uniform(3.0, 6.0)))
    chrom_size = _even(72.0 / mpp, 64, 512)
    chrom_coarse = _bandpass_texture(rng, chrom_size, mpp, min(0.38, 0.4 / mpp), 0.12)
    chrom_fine = _bandpass_texture(rng, chrom_size, mpp, min(0.8, 0.45 / mpp), 0.25)
    mottle = _bandpass_texture(rng, _even(300.0 / mpp, 64, min(big, 1536)), mpp, 0.12, 0.08)
    fat = _fat_texture(rng, _even(640.0 / mpp, 64, min(big, 2560)), mpp)
    bg_noise = rng.standard_normal((263, 263)).astype(np.float32)

    acini = info.pop("acini")
    info["n_acini"] = len(acini)
    nuclei = _place_nuclei(grid, rng, fields, fibre_angles, info["gland_lining_um"], acini)
    x_px = (nuclei.x_um / mpp).astype(np.float64)
    y_px = (nuclei.y_um / mpp).astype(np.float64)
    bound = nuclei.r_um * np.sqrt(nuclei.aspect) * (1 + np.abs(nuclei.h3) + np.abs(nuclei.g3))
    half = np.ceil(bound / mpp + 1.5).astype(np.int64)
    half = ((half + 1) // 2) * 2  # fewer distinct stamp sizes
    max_half = int(half.max()) if len(half) else 0

    blur_sigma = float(rng.uniform(2.0, 3.5)) / mpp if blurred_patch else 0.0
    pen_colour = info.get("pen_mark", {}).get("colour", "green")
    pen_od = np.array([0.95, 0.28, 0.72] if pen_colour == "green" else [0.95, 0.6, 0.12])
    info["n_nuclei_by_kind"] = {name: int((nuclei.kind == k).sum()) for k, name in enumerate(NUCLEUS_KINDS)}
    return _Scene(
        width=width,
        height=height,
        mpp=mpp,
        grid=grid,
        fields=fields,
        nuclei=nuclei,
        x_px=x_px,
        y_px=y_px,
        half=half,
        max_half=max_half,
        h_vec=(h_vec * h_scale).astype(np.float32),
        e_vec=(e_vec * e_scale).astype(np.float32),
        bg_od=bg_od,
        pen_od=(pen_od * rng.uniform(0.8, 1.2)).astype(np.float32),
        fibres=fibres,
        chrom_coarse=chrom_coarse,
        chrom_fine=chrom_fine,
        mottle=mottle,
        fat=fat,
        bg_noise=bg_noise,
        stroma_e=float(rng.uniform(0.5, 0.62)),
        gland_lining_um=info.pop("gland_lining_um"),
        has_pen=pen_mark,
        has_blur=blurred_patch,
        blur_sigma_px=blur_sigma,
        blur_margin=math.ceil(3 * blur_sigma) + 2 if blurred_patch else 0,
        info=info,
    )


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _upsample(scene: _Scene, channels: list[int], r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Bilinear upsampling of field channels to level-0 pixels ``[r0:r1, c0:c1]``."""
    g = scene.grid
    i0, wy = g.axis(r0, r1, g.gh)
    j0, wx = g.axis(c0, c1, g.gw)
    ia, ib = int(i0.min()), int(i0.max()) + 2
    ja, jb = int(j0.min()), int(j0.max()) + 2
    win = scene.fields[channels, ia:ib, ja:jb]
    jl = j0 - ja
    left = win[:, :, jl]
    cols = left + (win[:, :, jl + 1] - left) * wx
    il = i0 - ia
    top = cols[:, il, :]
    return top + (cols[:, il + 1, :] - top) * wy[:, None]


def _window_max(scene: _Scene, channel: int, r0: int, r1: int, c0: int, c1: int) -> float:
    d = scene.grid.d
    ia = max(0, (r0 // d) - 1)
    ja = max(0, (c0 // d) - 1)
    ib = min(scene.grid.gh, r1 // d + 2)
    jb = min(scene.grid.gw, c1 // d + 2)
    return float(scene.fields[channel, ia:ib, ja:jb].max())


def _weight(sd: np.ndarray, edge_um: float) -> np.ndarray:
    return np.clip(0.5 + sd * (1.0 / edge_um), 0.0, 1.0)


def _splat_nuclei(
    scene: _Scene, r0: int, r1: int, c0: int, c1: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Accumulate nuclear hematoxylin, coarse-chromatin share and coverage."""
    mh = scene.max_half
    lo = int(np.searchsorted(scene.y_px, r0 - mh - 1, side="left"))
    hi = int(np.searchsorted(scene.y_px, r1 + mh + 1, side="right"))
    if hi <= lo:
        return None
    xs = scene.x_px[lo:hi]
    sel = lo + np.flatnonzero((xs >= c0 - mh - 1) & (xs < c1 + mh + 1))
    if not len(sel):
        return None
    h, w = r1 - r0, c1 - c0
    pad = 2 * mh + 2
    hp, wp = h + 2 * pad, w + 2 * pad
    acc_d = np.zeros(hp * wp)
    acc_c = np.zeros(hp * wp)
    acc_a = np.zeros(hp * wp)
    mpp = np.float32(scene.mpp)
    halves = scene.half[sel]
    for half in np.unique(halves):
        group = sel[halves == half]
        size = 2 * int(half) + 1
        per_chunk = max(1, _STAMP_CHUNK // (size * size))
        offs = np.arange(-half, half + 1)
        for start in range(0, len(group), per_chunk):
            idx = group[start : start + per_chunk]
            n = scene.nuclei.take(idx)
            xp, yp = scene.x_px[idx], scene.y_px[idx]
            cx = np.floor(xp).astype(np.int64)
            cy = np.floor(yp).astype(np.int64)
            dx = ((cx - xp)[:, None] + (offs + 0.5)[None, :]).astype(np.float32) * mpp
            dy = ((cy - yp)[:, None] + (offs + 0.5)[None, :]).astype(np.float32) * mpp
            ca = np.cos(n.angle)[:, None, None]
            sa = np.sin(n.angle)[:, None, None]
            dxb, dyb = dx[:, None, :], dy[:, :, None]
            u = dxb * ca + dyb * sa
            v = dyb * ca - dxb * sa
            sq = np.sqrt(n.aspect)
            us = u * (1.0 / (n.r_um * sq))[:, None, None]
            vs = v * (sq / n.r_um)[:, None, None]
            rho2 = us * us + vs * vs
            rho = np.sqrt(rho2) + np.float32(1e-6)
            us2 = us * us
            vs2 = vs * vs
            harm = (
                n.h3[:, None, None] * us * (us2 - 3 * vs2) + n.g3[:, None, None] * vs * (3 * us2 - vs2)
            ) / (rho2 * rho)
            rn = rho / (1.0 + harm)
            sharp = (n.r_um / (mpp * 0.9))[:, None, None]
            alpha = np.clip((1.0 - rn) * sharp + 0.5, 0.0, 1.0)
            rim = n.rim[:, None, None]
            rc = np.minimum(rn, 1.0)
            prof = (1.0 - rim) + rim * (rc * rc * rc)
            dens = alpha * prof * n.dark[:, None, None]
            if np.any(n.nucleolus > 0):
                du = u - n.nu[:, None, None]
                dv = v - n.nv[:, None, None]
                k = (-0.5 / (n.ns * n.ns))[:, None, None]
                dens += n.nucleolus[:, None, None] * alpha * np.exp((du * du + dv * dv) * k)
            rows = (cy - r0 + pad)[:, None, None] + offs[None, :, None]
            cols = (cx - c0 + pad)[:, None, None] + offs[None, None, :]
            flat = (rows * wp + cols).ravel()
            acc_d += np.bincount(flat, dens.ravel(), hp * wp)
            acc_c += np.bincount(flat, (dens * n.coarse[:, None, None]).ravel(), hp * wp)
            acc_a += np.bincount(flat, alpha.ravel(), hp * wp)
    crop = (slice(pad, pad + h), slice(pad, pad + w))
    return (
        acc_d.reshape(hp, wp)[crop].astype(np.float32),
        acc_c.reshape(hp, wp)[crop].astype(np.float32),
        np.minimum(acc_a.reshape(hp, wp)[crop], 1.0).astype(np.float32),
    )


def _render_region(scene: _Scene, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Render level-0 pixels ``[r0:r1, c0:c1]`` as float32 RGB in [0, 255]."""
    h, w = r1 - r0, c1 - c0
    noise = _take2d(scene.bg_noise, r0, r1, c0, c1)
    od = np.empty((3, h, w), np.float32)
    for ch in range(3):
        od[ch] = scene.bg_od[ch] + 0.006 * noise
    tissue_present = _window_max(scene, _F_TISSUE, r0, r1, c0, c1) > -2.0
    if tissue_present:
        present = {
            c: _window_max(scene, c, r0, r1, c0, c1) > -6.0 for c in (_F_TUMOUR, _F_LYMPH, _F_EPI, _F_FAT)
        }
        present[_F_LOBULE] = _window_max(scene, _F_LOBULE, r0, r1, c0, c1) > -40.0
        chans = [_F_TISSUE, _F_THICK, _F_FIB0, _F_FIB1, _F_FIB2] + [
            c for c in (_F_TUMOUR, _F_NEST, _F_LYMPH, _F_EPI, _F_FAT, _F_LOBULE) if present.get(c, True)
        ]
        if not present[_F_TUMOUR]:
            chans.remove(_F_NEST)
        up = dict(zip(chans, _upsample(scene, chans, r0, r1, c0, c1), strict=True))
        zero = np.zeros((h, w), np.float32)
        w_tis = _weight(up[_F_TISSUE], 1.2)
        w_tum = _weight(up[_F_TUMOUR], 2.5) if _F_TUMOUR in up else zero
        w_nest = _weight(up[_F_NEST], 2.0) if _F_NEST in up else zero
        w_lym = _weight(up[_F_LYMPH], 4.0) if _F_LYMPH in up else zero
        w_epi = _weight(up[_F_EPI], 3.0) if _F_EPI in up else zero
        w_fat = _weight(up[_F_FAT], 2.0) if _F_FAT in up else zero
        w_str = np.clip(1.0 - w_tum - w_lym - w_epi - w_fat, 0.0, 1.0)
        mottle = _take2d(scene.mottle, r0, r1, c0, c1)

        # Collagen: three oriented periodic textures blended by low-frequency weights.
        fib = up[_F_FIB0] * _take2d(scene.fibres[0], r0, r1, c0, c1)
        fib += up[_F_FIB1] * _take2d(scene.fibres[1], r0, r1, c0, c1)
        fib += up[_F_FIB2] * _take2d(scene.fibres[2], r0, r1, c0, c1)
        norm = np.sqrt(up[_F_FIB0] ** 2 + up[_F_FIB1] ** 2 + up[_F_FIB2] ** 2)
        fib /= norm
        fibre_e = scene.stroma_e * (0.82 + 0.22 * np.tanh(0.8 * fib))
        # Thin clefts between bundles are nearly white.
        fibre_e *= np.clip((fib + 1.9) * 1.1, 0.08, 1.0)
        if _F_LOBULE in up:  # loose, paler intralobular stroma
            loose = _weight(up[_F_LOBULE], 25.0) * 0.75
            loose_e = scene.stroma_e * (0.5 + 0.12 * mottle)
            fibre_e += (loose_e - fibre_e) * loose

        stroma_w = w_str + w_tum * (1.0 - w_nest)
        e_cyto = stroma_w * fibre_e
        h_cyto = stroma_w * np.float32(0.04)
        cyto = 1.0 + 0.18 * mottle
        if _F_EPI in up:
            lumen = w_epi * _weight(up[_F_EPI] - scene.gland_lining_um, 2.0)
            lining = w_epi - lumen
            e_cyto += lining * (0.36 * cyto) + lumen * (0.045 + 0.015 * mottle)
            h_cyto += lining * (0.09 * cyto) + lumen * 0.01
        e_cyto += w_lym * (0.2 * cyto)
        h_cyto += w_lym * (0.12 * cyto)
        tum_cell = w_tum * w_nest
        e_cyto += tum_cell * (0.36 * cyto)
        h_cyto += tum_cell * (0.15 * cyto)
        if present[_F_FAT]:
            fat = _take2d(scene.fat, r0, r1, c0, c1)
            e_cyto += w_fat * (0.012 + 0.55 * fat)
            h_cyto += w_fat * (0.004 + 0.05 * fat)

        nuc = _splat_nuclei(scene, r0, r1, c0, c1)
        if nuc is not None:
            dens, coarse, cover = nuc
            fine = _take2d(scene.chrom_fine, r0, r1, c0, c1)
            clumps = _take2d(scene.chrom_coarse, r0, r1, c0, c1)
            dens = dens * (1.0 + 0.12 * fine) + coarse * (0.5 * np.clip(clumps, -1.5, 2.0))
            dens = np.clip(dens, 0.0, 3.2)
            h_tot = h_cyto * (1.0 - 0.5 * cover) + dens
            e_tot = e_cyto * (1.0 - 0.65 * cover) + 0.12 * dens
        else:
            h_tot, e_tot = h_cyto, e_cyto
        scale = w_tis * up[_F_THICK]
        h_tot *= scale
        e_tot *= scale
        for ch in range(3):
            od[ch] += h_tot * scene.h_vec[ch] + e_tot * scene.e_vec[ch]
    if scene.has_pen and _window_max(scene, _F_PEN, r0, r1, c0, c1) > -4.0:
        (pen_sd,) = _upsample(scene, [_F_PEN], r0, r1, c0, c1)
        streak = _take2d(scene.mottle, r0 + 7919, r1 + 7919, c0 + 104_729, c1 + 104_729)
        ink = _weight(pen_sd, 6.0) * (0.85 + 0.12 * streak)
        ink *= 1.0 + 0.25 * np.exp(-np.maximum(pen_sd, 0.0) * 0.08)  # darker rim
        for ch in range(3):
            od[ch] += ink * scene.pen_od[ch]
    rgb = np.exp(-od, out=od)
    rgb *= 255.0
    return np.moveaxis(rgb, 0, -1)


def _render_block(scene: _Scene, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Render one level-0 block to uint8 RGB (with the out-of-focus patch applied)."""
    m = 0
    if scene.has_blur and _window_max(scene, _F_BLUR, r0, r1, c0, c1) > 0.0:
        m = scene.blur_margin
    rgb = _render_region(scene, r0 - m, r1 + m, c0 - m, c1 + m)
    if m:
        (weight,) = _upsample(scene, [_F_BLUR], r0, r1, c0, c1)
        sigma = scene.blur_sigma_px
        blurred = ndimage.gaussian_filter(rgb, (sigma, sigma, 0), truncate=3.0)
        core = rgb[m:-m, m:-m]
        rgb = core + (blurred[m:-m, m:-m] - core) * weight[:, :, None]
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Pyramid writing
# --------------------------------------------------------------------------------------


def _encode_tiles(strip: np.ndarray, tile: int, quality: int) -> list[bytes]:
    """JPEG-encode one row of tiles (``strip`` has at most ``tile`` rows)."""
    out = []
    w = strip.shape[1]
    for c in range(0, w, tile):
        t = strip[:, c : c + tile]
        if t.shape[0] != tile or t.shape[1] != tile:
            t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)), mode="edge")
        out.append(
            imagecodecs.jpeg8_encode(
                np.ascontiguousarray(t),
                level=quality,
                colorspace="RGB",
                outcolorspace="YCBCR",
                subsampling=(2, 2),
            )
        )
    return out


def _down2(a: np.ndarray) -> np.ndarray:
    """2x2 box downsampling of uint8 RGB, duplicating the last odd row/column."""
    h, w = a.shape[:2]
    if h % 2 or w % 2:
        a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    s = a.astype(np.uint16)
    out = s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2] + 2
    return (out >> 2).astype(np.uint8)


def _block_job(
    scene: _Scene, r0: int, r1: int, c0: int, c1: int, tile: int, quality: int
) -> tuple[list[list[bytes]], np.ndarray]:
    rgb = _render_block(scene, r0, r1, c0, c1)
    tiles = [_encode_tiles(rgb[r : r + tile], tile, quality) for r in range(0, r1 - r0, tile)]
    return tiles, _down2(rgb)


class _Pyramid:
    """Streams reduced levels: buffers rows, encodes tile rows, cascades downsampling."""

    def __init__(
        self, dims: list[tuple[int, int]], tile: int, quality: int, pool: ThreadPoolExecutor
    ) -> None:
        self.dims = dims  # (width, height) of levels 1..n
        self.tile, self.quality, self.pool = tile, quality, pool
        self.pending = [np.zeros((0, w, 3), np.uint8) for w, _ in dims]
        self.carry = [np.zeros((0, w, 3), np.uint8) for w, _ in dims]
        self.tiles: list[list[Future[list[bytes]]]] = [[] for _ in dims]

    def push(self, k: int, rows: np.ndarray) -> None:
        if k >= len(self.dims) or len(rows) == 0:
            return
        buf = np.concatenate([self.pending[k], rows]) if len(self.pending[k]) else rows
        n_full = len(buf) // self.tile * self.tile
        for r in range(0, n_full, self.tile):
            self._emit(k, buf[r : r + self.tile])
        self.pending[k] = buf[n_full:]
        if k + 1 < len(self.dims):
            src = np.concatenate([self.carry[k], rows]) if len(self.carry[k]) else rows
            even = len(src) // 2 * 2
            self.carry[k] = src[even:]
            if even:
                self.push(k + 1, _down2(src[:even]))

    def _emit(self, k: int, rows: np.ndarray) -> None:
        rows = rows.copy()
        self.tiles[k].append(self.pool.submit(_encode_tiles, rows, self.tile, self.quality))

    def finish(self) -> None:
        for k in range(len(self.dims)):
            if len(self.pending[k]):
                self._emit(k, self.pending[k])
                self.pending[k] = self.pending[k][:0]
            if k + 1 < len(self.dims) and len(self.carry[k]):
                rest = self.carry[k]
                self.carry[k] = rest[:0]
                self.push(k + 1, _down2(rest))


class _Abort(Exception):
    pass


class _TiffWriterThread(threading.Thread):
    """Writes pages from tiles arriving on a queue (tifffile pulls an iterator)."""

    _STOP = object()

    def __init__(self, path: Path, pages: list[dict[str, Any]], bigtiff: bool) -> None:
        super().__init__(name="synthetic-tiff-writer", daemon=True)
        self.path, self.pages, self.bigtiff = path, pages, bigtiff
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=2048)
        self.error: BaseException | None = None

    def _tiles(self, n: int) -> Iterator[bytes]:
        for _ in range(n):
            item = self.queue.get()
            if item is self._STOP:
                raise _Abort
            yield item

    def run(self) -> None:
        try:
            with tifffile.TiffWriter(self.path, bigtiff=self.bigtiff) as tif:
                for page in self.pages:
                    page = dict(page)
                    n = page.pop("n_tiles")
                    tif.write(self._tiles(n), **page)
        except BaseException as exc:  # reported to the producer
            self.error = exc

    def failure(self) -> BaseException:
        """The writer's error as the producer should raise it (a full disk is one line)."""
        if isinstance(self.error, OSError):
            return output_error(self.error, self.path.parent)
        return RuntimeError(f"writing {self.path.name} failed: {self.error}")

    def put(self, item: Any) -> None:
        while True:
            if self.error is not None:
                raise self.failure() from self.error
            if not self.is_alive():
                raise RuntimeError(f"TIFF writer for {self.path} stopped unexpectedly")
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def abort(self) -> None:
        if self.is_alive():
            try:
                while True:
                    self.queue.get_nowait()
            except queue.Empty:
                pass
            try:
                self.queue.put_nowait(self._STOP)
            except queue.Full:  # pragma: no cover
                pass
        self.join(timeout=30)


def _level_dims(width: int, height: int) -> list[tuple[int, int]]:
    dims = [(width, height)]
    while min(dims[-1]) > 1024:
        w, h = dims[-1]
        dims.append(((w + 1) // 2, (h + 1) // 2))
    return dims


def _n_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _parse_size(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        width = height = int(size)
    else:
        width, height = (int(s) for s in size)
    if width < 256 or height < 256:
        raise ValueError(f"synthetic slides must be at least 256 x 256 px, got {width} x {height}")
    return width, height


# --------------------------------------------------------------------------------------
# Ground truth files
# --------------------------------------------------------------------------------------


def _write_truth(
    scene: _Scene,
    slide_path: Path,
    seed: int,
    options: dict[str, Any],
    levels: list[tuple[int, int]],
) -> SyntheticTruth:
    paths = truth_paths(slide_path)
    del paths["slide_path"]
    grid = scene.grid
    tissue = scene.fields[_F_TISSUE] > 0
    tumour_field = scene.fields[_F_TUMOUR]
    tumour = tumour_field > 0
    for key, array in (("tissue_png", tissue), ("tumour_png", tumour)):
        with atomic_path(paths[key], suffix=".png") as tmp:
            Image.fromarray(array.astype(np.uint8) * 255).save(tmp, format="PNG")

    polygons = field_to_polygons(tumour_field, 0.0, scale=float(grid.d))
    clipped = []
    for polygon in polygons:
        rings = []
        for ring in polygon:
            ring = ring.copy()
            np.clip(ring[:, 0], 0, scene.width, out=ring[:, 0])
            np.clip(ring[:, 1], 0, scene.height, out=ring[:, 1])
            rings.append(np.round(ring, 2))
        clipped.append(rings)
    geojson = polygons_to_geojson(clipped, classification="Tumor", color=(200, 0, 0))
    atomic_write(paths["tumour_geojson"], json.dumps(geojson))
    tumour_area_um2 = float(sum(polygon_area(p) for p in clipped)) * scene.mpp**2

    n = scene.nuclei
    labels = np.where(n.kind == _TUMOUR, "tumour", "normal")
    kinds = np.asarray(NUCLEUS_KINDS)[n.kind]
    lines = ["x_um,y_um,label,radius_um,kind"]
    lines += [
        f"{x:.2f},{y:.2f},{lab},{r:.2f},{k}"
        for x, y, lab, r, k in zip(
            n.x_um.tolist(),
            n.y_um.tolist(),
            labels.tolist(),
            n.r_um.tolist(),
            kinds.tolist(),
            strict=True,
        )
    ]
    atomic_write(paths["nuclei_csv"], "\n".join(lines) + "\n")

    n_tumour_nuclei = int((n.kind == _TUMOUR).sum())
    label = "tumour" if tumour.any() else "normal"
    mask_mpp = grid.d * scene.mpp
    info = dict(scene.info)
    truth = {
        "label": label,
        "mpp": scene.mpp,
        "width": scene.width,
        "height": scene.height,
        "seed": int(seed),
        "tumour_area_um2": tumour_area_um2,
        "tumour_area_mm2": tumour_area_um2 / 1e6,
        "tissue_area_mm2": float(tissue.sum()) * mask_mpp**2 / 1e6,
        "mask_mpp": mask_mpp,
        "mask_downsample": grid.d,
        "mask_shape": [grid.gh, grid.gw],
        "n_nuclei": len(n),
        "n_tumour_nuclei": n_tumour_nuclei,
        "n_nuclei_by_kind": info.pop("n_nuclei_by_kind"),
        "n_lesions": len(info.get("lesions", [])),
        "lesions": info.pop("lesions", []),
        "levels": [list(d) for d in levels],
        "artefacts": {k: info.pop(k) for k in ("pen_mark", "blurred_patch") if k in info},
        "stain": info.pop("stain"),
        "files": {k: p.name for k, p in paths.items()} | {"slide": slide_path.name},
        "generator": GENERATOR,
        "options": options,
    }
    atomic_write(paths["truth_json"], json.dumps(truth, indent=2))
    return SyntheticTruth(
        slide_path=slide_path,
        label=label,
        mpp=scene.mpp,
        width=scene.width,
        height=scene.height,
        tumour_area_um2=tumour_area_um2,
        mask_mpp=mask_mpp,
        n_nuclei=len(n),
        **paths,
    )


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def generate_synthetic_slide(
    path: str | os.PathLike[str],
    size: int | tuple[int, int] = 20_000,
    seed: int = 0,
    *,
    negative: bool = False,
    tumour_size: str = "macro",
    mpp: float = 0.5,
    pen_mark: bool = False,
    blurred_patch: bool = False,
    tile_size: int = 256,
    jpeg_quality: int = 85,
) -> Generator[Progress, None, SyntheticTruth]:
    """Write a synthetic H&E whole-slide image and its ground truth.

    Parameters
    ----------
    path : path-like
        Output TIFF (e.g. ``OUT.tif``); sidecars are written beside it.
    size : int or tuple of int
        Level-0 size, square or ``(width, height)``, in pixels.
    seed : int
        Random seed; the same arguments give identical pixels and truth.
    negative : bool
        No tumour (label ``"normal"``).
    tumour_size : {"macro", "micro"}
        1-3 lesions of ~0.5-3 mm, or one ~0.2-0.6 mm micro-metastasis
        (scaled down on small slides).
    mpp : float
        Level-0 micrometres per pixel (0.25-1.0 recommended).
    pen_mark : bool
        Add a green or blue marker stroke.
    blurred_patch : bool
        Render a region out of focus.
    tile_size : int
        TIFF tile size (multiple of 16).
    jpeg_quality : int
        JPEG quality (1-100).

    Yields
    ------
    Progress
        Work done, in level-0 blocks.

    Returns
    -------
    SyntheticTruth
        Paths and facts of what was written.

    """
    width, height = _parse_size(size)
    if tumour_size not in ("macro", "micro"):
        raise ValueError(f"tumour_size must be 'macro' or 'micro', got {tumour_size!r}")
    mpp = float(mpp)
    if not 0.05 <= mpp <= 10.0:
        raise ValueError(f"mpp must be in [0.05, 10], got {mpp}")
    tile = int(tile_size)
    if tile < 16 or tile % 16:
        raise ValueError(f"tile_size must be a positive multiple of 16, got {tile_size}")
    quality = int(jpeg_quality)
    if not 1 <= quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    path = Path(path)
    ensure_writable_dir(path.parent)  # a read-only or missing output folder is said before the work
    options = {
        "negative": bool(negative),
        "tumour_size": tumour_size,
        "pen_mark": bool(pen_mark),
        "blurred_patch": bool(blurred_patch),
        "tile_size": tile,
        "jpeg_quality": quality,
    }

    block = max(tile, _BLOCK // tile * tile)
    strips = list(range(0, height, block))
    cols = list(range(0, width, block))
    total = len(strips) * len(cols) + 2
    yield Progress(0, total, "building scene")
    scene = _build_scene(
        width, height, mpp, seed, bool(negative), tumour_size, bool(pen_mark), bool(blurred_patch)
    )
    yield Progress(1, total, "rendering")

    levels = _level_dims(width, height)
    common = {
        "dtype": np.uint8,
        "tile": (tile, tile),
        "compression": "jpeg",
        "photometric": "rgb",
        "subsampling": (2, 2),
        "metadata": None,
        "software": "napari-pathology",
    }
    pages = []
    for k, (w, h) in enumerate(levels):
        page = dict(common, shape=(h, w, 3), n_tiles=math.ceil(h / tile) * math.ceil(w / tile))
        if k == 0:
            page["description"] = f"{GENERATOR}; seed={int(seed)}; mpp={mpp:g}"
            page["resolution"] = (1e4 / mpp, 1e4 / mpp)
            page["resolutionunit"] = "CENTIMETER"
        else:
            page["subfiletype"] = 1
            page["resolution"] = (1e4 / mpp / 2**k, 1e4 / mpp / 2**k)
            page["resolutionunit"] = "CENTIMETER"
        pages.append(page)
    bigtiff = width * height * 3 * 4 // 3 > 2**31 - 2**26
    # The TIFF is written to a temporary file beside ``path`` and moved over it only when
    # complete: a full disk, an error or an interrupt never leaves a torn slide or removes an old one.
    with atomic_path(path, suffix=path.suffix) as tmp:
        writer = _TiffWriterThread(tmp, pages, bigtiff)
        pool = ThreadPoolExecutor(max_workers=_n_workers(), thread_name_prefix="synthetic")
        pyramid = _Pyramid(levels[1:], tile, quality, pool)
        finished = False
        writer.start()
        try:
            in_flight: dict[int, list[Future[tuple[list[list[bytes]], np.ndarray]]]] = {}

            def submit(s: int) -> None:
                r0 = strips[s]
                r1 = min(height, r0 + block)
                in_flight[s] = [
                    pool.submit(_block_job, scene, r0, r1, c0, min(width, c0 + block), tile, quality)
                    for c0 in cols
                ]

            lookahead = max(1, math.ceil(2 * _n_workers() / len(cols)))
            for s in range(min(lookahead + 1, len(strips))):
                submit(s)
            done = 1
            for s in range(len(strips)):
                results = [f.result() for f in in_flight.pop(s)]
                if s + lookahead + 1 < len(strips):
                    submit(s + lookahead + 1)
                n_tile_rows = len(results[0][0])
                for tr in range(n_tile_rows):
                    for tiles, _ in results:
                        for data in tiles[tr]:
                            writer.put(data)
                if len(levels) > 1:
                    pyramid.push(0, np.concatenate([down for _, down in results], axis=1))
                done += len(cols)
                yield Progress(done, total, f"rendered strip {s + 1}/{len(strips)}")
            pyramid.finish()
            for k, futures in enumerate(pyramid.tiles):
                for fut in futures:
                    for data in fut.result():
                        writer.put(data)
                yield Progress(done, total, f"wrote level {k + 1}/{len(levels) - 1}")
            writer.join()
            if writer.error is not None:
                raise writer.failure() from writer.error
            finished = True
        finally:
            if not finished:
                writer.abort()
                pool.shutdown(wait=True, cancel_futures=True)
            else:
                pool.shutdown(wait=True)
        # the truth files first, then the slide replaces any old one: a failure leaves the old slide
        truth = _write_truth(scene, path, seed, options, levels)
    yield Progress(total, total, "done")
    return truth


def write_synthetic_slide(
    path: str | os.PathLike[str], size: int | tuple[int, int] = 20_000, seed: int = 0, **kwargs: Any
) -> SyntheticTruth:
    """Write a synthetic slide, blocking until done.

    Parameters
    ----------
    path : path-like
        Output TIFF.
    size : int or tuple of int
        Level-0 size in pixels.
    seed : int
        Random seed.
    **kwargs
        Passed to :func:`generate_synthetic_slide`.

    Returns
    -------
    SyntheticTruth
        Paths and facts of what was written.

    """
    return run_to_completion(generate_synthetic_slide(path, size, seed, **kwargs))
