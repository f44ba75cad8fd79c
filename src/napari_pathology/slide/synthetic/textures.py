"""Periodic textures (fibres, chromatin, mottle, fat) sampled by global pixel coordinates.

Periodic textures let blocks rendered in any order by any thread join seamlessly.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import fft as sp_fft
from scipy import ndimage
from scipy.spatial import cKDTree


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
