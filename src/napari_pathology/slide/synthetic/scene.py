"""The scene: everything a block renderer needs, built once per slide (immutable once built)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_pathology.slide.synthetic.fields import _build_fields, _Grid
from napari_pathology.slide.synthetic.nuclei import NUCLEUS_KINDS, _Nuclei, _place_nuclei
from napari_pathology.slide.synthetic.textures import (
    _bandpass_texture,
    _even,
    _fat_texture,
    _warp_periodic,
)


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
    tumour_type: str | None = None  # "A", "B", or None on a normal slide
    info: dict[str, Any] = field(default_factory=dict)


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
    tumour_type: str = "A",
) -> _Scene:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED, 1]))
    # Type B draws from its own stream: type A (and all but the tumour of a type B slide) keep their pixels.
    type_b_rng = None
    if tumour_type == "B" and not negative:
        type_b_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED, 0xB]))
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
    nuclei = _place_nuclei(grid, rng, fields, fibre_angles, info["gland_lining_um"], acini, type_b_rng)
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
        tumour_type=None if negative else tumour_type,
        info=info,
    )
