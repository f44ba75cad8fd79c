"""How a model runs over a slide: the run settings, the checks before any work, the run's key (no Qt).

:class:`RunSettings` refuses settings that cannot work when it is made;
:func:`check_run` says why a slide and a model cannot run together, in the
order a user should fix it; :func:`run_key` fingerprints everything a result
depends on, so a saved result is reused only when nothing changed.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_pathology.fileio import require_finite
from napari_pathology.slide.backends import PLAUSIBLE_MPP

__all__ = [
    "MAX_BATCH_SIZE",
    "MAX_STRIDE",
    "MIN_PLAUSIBLE_MPP",
    "NoTissueError",
    "RunSettings",
    "RunSettingsError",
    "check_run",
    "model_stride",
    "run_key",
    "weights_digest",
]

#: Largest stride and batch size accepted (px at the model's um/px; tiles per batch).
MAX_STRIDE = 1_000_000
MAX_BATCH_SIZE = 65_536
#: Level-0 um/px finer than this is not a light-microscope slide (the slides' PLAUSIBLE_MPP floor).
MIN_PLAUSIBLE_MPP = PLAUSIBLE_MPP[0]


class NoTissueError(ValueError):
    """The slide has no tile with enough tissue to analyse."""


class RunSettingsError(ValueError):
    """A run setting is out of range; ``field`` names the setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class RunSettings:
    """How to run a model over a slide.

    Parameters
    ----------
    stride : int, optional
        Pixels at the model's um/px between tiles (default: the model's).
    batch_size : int
        Tiles per forward pass (halved automatically on out-of-memory).
    device : str
        ``"cpu"``, ``"cuda:N"`` or ``"auto"``.
    tta : bool, optional
        Average the 8 dihedral orientations (default: the model's setting).
    amp : bool
        Mixed precision on GPU.
    min_tissue_fraction : float
        Tiles whose centre region holds less tissue are skipped.
    nms_threshold, nms_radius : float
        Non-maximum suppression for detections (radius in heatmap cells).
    workers : int
        Tile-reading threads.
    save_every_s : float, optional
        Seconds between saves of a partial result (default: the engine's).
    """

    stride: int | None = None
    batch_size: int = 32
    device: str = "cpu"
    tta: bool | None = None
    amp: bool = True
    min_tissue_fraction: float = 0.25
    nms_threshold: float = 0.5
    nms_radius: float = 5.0
    workers: int = 2
    save_every_s: float | None = None

    def __post_init__(self) -> None:
        """Refuse settings that cannot work (NaN, negative, zero, absurd) before any work starts."""
        if self.stride is not None:
            _check_int(self.stride, "stride", 1, MAX_STRIDE, "px at the model's um/px")
        _check_int(self.batch_size, "batch_size", 1, MAX_BATCH_SIZE, "tiles")
        _check_int(self.workers, "workers", 0, 64, "threads")
        for name, low, high in (
            ("min_tissue_fraction", 0.0, 1.0), ("nms_threshold", 0.0, 1.0), ("nms_radius", 0.0, None),
        ):  # fmt: skip
            try:
                require_finite(getattr(self, name), name.replace("_", " "), minimum=low, maximum=high)
            except ValueError as error:
                raise RunSettingsError(name, str(error)) from None
        if self.save_every_s is not None:
            try:
                require_finite(self.save_every_s, "partial-save interval (s)", minimum=0.0)
            except ValueError as error:
                raise RunSettingsError("save_every_s", str(error)) from None
        if not isinstance(self.device, str) or not self.device.strip():
            raise RunSettingsError(
                "device", f"device must be a name such as cpu or cuda:0, got {self.device!r}"
            )
        for name in ("tta", "amp"):
            value = getattr(self, name)
            if not (isinstance(value, bool | np.bool_) or (name == "tta" and value is None)):
                raise RunSettingsError(name, f"{name} must be true or false, got {value!r}")


def _check_int(value: Any, name: str, low: int, high: int, unit: str) -> None:
    label = name.replace("_", " ")
    if isinstance(value, bool) or not isinstance(value, int | np.integer | float):
        raise RunSettingsError(name, f"{label} must be a whole number, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise RunSettingsError(name, f"{label} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise RunSettingsError(name, f"{label} must be between {low} and {high} {unit}, got {value!r}")


def model_stride(spec: Any, settings: RunSettings | None) -> int:
    """The stride a run uses: the settings' one, else the model's ``default_stride``."""
    if settings is not None and settings.stride is not None:
        return int(settings.stride)
    return int(spec.default_stride)


def _whole_slide_input(spec: Any) -> bool:
    """Whether the spec's family reads the whole slide as one input (input kind ``slide``)."""
    from napari_pathology.families import family_of

    try:
        return family_of(spec).input_kind == "slide"
    except KeyError:  # a model of no registered family
        return False


def check_run(slide: Any, spec: Any, settings: RunSettings | None = None) -> None:
    """Say why a run cannot work, in the order a user should fix it, before any work.

    Checked: the slide's um/px is plausible; the slide reaches the model's
    um/px; the slide is not smaller than a model tile; the stride is not
    larger than the slide. Tissue comes after these (its absence is then the
    real cause). A model that reads nuclei, not tiles, gets the first check only.

    Raises
    ------
    ValueError
        One line naming the slide, the model and the cause.
    """
    from napari_pathology.tiles import MPP_TOLERANCE

    settings = settings or RunSettings()
    mpp_x, mpp_y = (float(v) for v in slide.require_mpp())
    if not all(math.isfinite(v) and v > 0 for v in (mpp_x, mpp_y)):
        raise ValueError(f"{slide.name}: um/px must be a positive number, got {mpp_x!r} x {mpp_y!r}")
    width, height = (int(v) for v in slide.dimensions)
    width_um, height_um = width * mpp_x, height * mpp_y
    size = f"{width_um:.4g} x {height_um:.4g} um"
    if min(mpp_x, mpp_y) < MIN_PLAUSIBLE_MPP:
        raise ValueError(
            f"{slide.name}: {min(mpp_x, mpp_y):.3g} um/px is implausible for {spec.name} (no light "
            f"microscope resolves below {MIN_PLAUSIBLE_MPP} um/px; the slide would be {size}); check the "
            "slide's um/px (--mpp or the Slide panel)"
        )
    if getattr(spec, "output", None) == "nuclei":
        return
    finest = max(mpp_x, mpp_y) * min(float(d) for d in slide.level_downsamples)
    if finest > spec.mpp * (1.0 + MPP_TOLERANCE):
        raise ValueError(
            f"{spec.name} needs {spec.mpp:g} um/px but {slide.name} has at best {finest:.4g} um/px "
            "(scanned at a lower magnification); use a model for a coarser um/px, or check the slide's um/px"
        )
    if _whole_slide_input(spec):  # one network over the whole slide: no tile or step has to fit in it
        return
    tile_um = spec.input_size * spec.mpp
    if max(width_um, height_um) < tile_um / 2:
        raise ValueError(
            f"{slide.name} is {size} at {max(mpp_x, mpp_y):.4g} um/px, smaller than half of one {spec.name} "
            f"tile ({spec.input_size} px at {spec.mpp:g} um/px = {tile_um:.4g} um); check the slide's um/px"
        )
    stride = model_stride(spec, settings)
    stride_um = stride * spec.mpp
    if stride_um > max(width_um, height_um):
        if settings.stride is None:
            raise ValueError(
                f"{slide.name} ({size}) is smaller than one step of {spec.name} ({stride} px at {spec.mpp:g} "
                f"um/px = {stride_um:.4g} um); check the slide's um/px or choose a smaller stride"
            )
        largest = max(1, int(max(width_um, height_um) / spec.mpp))
        raise ValueError(
            f"stride {stride} px at {spec.mpp:g} um/px ({stride_um:.4g} um) is larger than {slide.name} "
            f"({size}); use a stride of at most {largest} px (the model's default is {spec.default_stride})"
        )


def weights_digest(model: Any) -> str:
    """Short SHA-256 of a model's parameters and buffers (changes when weights change)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _mask_digest(tissue: Any) -> str | None:
    if tissue is None:
        return None
    mask = np.ascontiguousarray(np.asarray(tissue.mask, dtype=bool))
    return hashlib.sha256(mask.tobytes() + repr((mask.shape, float(tissue.mpp))).encode()).hexdigest()[:16]


def run_key(slide: Any, spec: dict[str, Any], digest: str, settings: RunSettings, tissue: Any) -> str:
    """Fingerprint of everything a result depends on: slide file, spec, weights, settings, tissue."""
    stamp = None
    if slide.path:
        stat = Path(slide.path).stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
    fields = {
        k: v
        for k, v in asdict(settings).items()
        if k not in {"batch_size", "device", "workers", "amp", "save_every_s"}
    }
    payload = {
        "slide": [slide.path, stamp, slide.mpp],
        "spec": spec,
        "weights": digest,
        "settings": fields,
        "tissue": _mask_digest(tissue),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]
