"""Rendering level-0 blocks of a scene to RGB (Beer-Lambert stain mixing)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from napari_pathology.slide.synthetic.fields import (
    _F_BLUR,
    _F_EPI,
    _F_FAT,
    _F_FIB0,
    _F_FIB1,
    _F_FIB2,
    _F_LOBULE,
    _F_LYMPH,
    _F_NEST,
    _F_PEN,
    _F_THICK,
    _F_TISSUE,
    _F_TUMOUR,
)
from napari_pathology.slide.synthetic.scene import _Scene
from napari_pathology.slide.synthetic.textures import _take2d

_STAMP_CHUNK = 800_000  # max stamp elements rendered at once

# The three fibre-orientation weights, each blending one periodic collagen texture.
_FIBRES = (_F_FIB0, _F_FIB1, _F_FIB2)
# A region is rendered in a window only where its field's maximum there exceeds this (um).
_PRESENT_ABOVE = {_F_TUMOUR: -6.0, _F_LYMPH: -6.0, _F_EPI: -6.0, _F_FAT: -6.0, _F_LOBULE: -40.0}
# Edge width (um) of each region's 0..1 weight (order: the unpacking in _render_region).
_EDGE_UM = {_F_TUMOUR: 2.5, _F_NEST: 2.0, _F_LYMPH: 4.0, _F_EPI: 3.0, _F_FAT: 2.0}


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
        present = {c: _window_max(scene, c, r0, r1, c0, c1) > lo for c, lo in _PRESENT_ABOVE.items()}
        chans = [_F_TISSUE, _F_THICK, *_FIBRES] + [
            c for c in (_F_TUMOUR, _F_NEST, _F_LYMPH, _F_EPI, _F_FAT, _F_LOBULE) if present.get(c, True)
        ]
        type_b = scene.tumour_type == "B"
        if not present[_F_TUMOUR] or type_b:  # type B grows in solid sheets: no nests, no septa
            chans.remove(_F_NEST)
        up = dict(zip(chans, _upsample(scene, chans, r0, r1, c0, c1), strict=True))
        zero = np.zeros((h, w), np.float32)
        w_tis = _weight(up[_F_TISSUE], 1.2)
        w_tum, w_nest, w_lym, w_epi, w_fat = (
            _weight(up[c], edge) if c in up else zero for c, edge in _EDGE_UM.items()
        )
        if type_b:
            w_nest = np.ones_like(zero)
        w_str = np.clip(1.0 - w_tum - w_lym - w_epi - w_fat, 0.0, 1.0)
        mottle = _take2d(scene.mottle, r0, r1, c0, c1)

        # Collagen: three oriented periodic textures blended by low-frequency weights.
        fib = sum(up[c] * _take2d(tex, r0, r1, c0, c1) for c, tex in zip(_FIBRES, scene.fibres, strict=True))
        norm = np.sqrt(sum(up[c] ** 2 for c in _FIBRES))
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
        if type_b:  # abundant, granular, more eosinophilic cytoplasm
            grain = _take2d(scene.chrom_coarse, r0 + 131, r1 + 131, c0 + 257, c1 + 257)
            e_cyto += tum_cell * (0.5 * cyto + 0.04 * grain)
            h_cyto += tum_cell * (0.06 * cyto)
        else:
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
