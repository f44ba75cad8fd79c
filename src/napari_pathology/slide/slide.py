"""Open a slide file with the right backend and expose it as a lazy pyramid.

What is refused, and why (issue 11):

- anything but a regular file (a FIFO, socket or device would block or stream
  forever), and empty files;
- a TIFF whose full-resolution level is truncated; a truncated or undecodable
  lower level is dropped and named in :attr:`Slide.warnings` (and ``info``);
- a slide whose coarsest level exceeds :data:`MAX_UNPYRAMIDED_PIXELS`: the
  viewer's small levels are computed from it (:data:`TOP_LEVEL_SIDE`), which
  reads all of it, in bounded memory; larger ones need a real pyramid;
- region reads above :data:`~napari_pathology.slide.backends.MAX_REGION_PIXELS`
  and images that must be decoded whole above
  :data:`~napari_pathology.slide.backends.MAX_DECODE_PIXELS`;
- a user um/px outside the range scanners give.

:attr:`Slide.brightfield` tells fluorescence (dark-field) slides from
brightfield ones; :meth:`Slide.require_brightfield` refuses them for the H&E
models and tissue masks.

The lazy pyramid lives in :mod:`napari_pathology.slide.pyramid`, the
brightfield judgement in :mod:`napari_pathology.slide.brightfield`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from napari_pathology.fileio import require_regular_file
from napari_pathology.slide.backends import (
    PLAUSIBLE_MPP,
    ImageBackend,
    OpenSlideBackend,
    SlideBackend,
    SlideOpenError,
    SlideReadError,
    TiffBackend,
    UnsupportedFormatError,
    quiet_tifffile,
    tiff_damage,
)
from napari_pathology.slide.brightfield import NotBrightfieldError, _slide_brightfield, judge_brightfield
from napari_pathology.slide.pyramid import (
    MAX_UNPYRAMIDED_PIXELS,
    TOP_LEVEL_SIDE,
    _check_pyramid,
    computed_levels,
    downsample_mean,
    file_level,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_UNPYRAMIDED_PIXELS",
    "OPENSLIDE_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "TIFF_SUFFIXES",
    "TOP_LEVEL_SIDE",
    "NotBrightfieldError",
    "Slide",
    "SlideInfo",
    "downsample_mean",
    "is_supported_path",
    "judge_brightfield",
    "open_slide",
]

#: File endings OpenSlide reads (vendor formats, generic tiled TIFF, DICOM WSI).
OPENSLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide",
    ".dcm",
)  # fmt: skip
#: File endings read through tifffile when OpenSlide does not (OME-TIFF, SubIFD pyramids).
TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf", ".tf8", ".tf2")
#: Plain single-level images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Everything :func:`open_slide` accepts.
SUPPORTED_SUFFIXES = tuple(dict.fromkeys(OPENSLIDE_SUFFIXES + TIFF_SUFFIXES + IMAGE_SUFFIXES))


def is_supported_path(path: str | Path) -> bool:
    """Whether the file name has an ending some backend reads (a cheap probe, no I/O)."""
    return str(path).lower().endswith(SUPPORTED_SUFFIXES)


@dataclass(frozen=True)
class SlideInfo:
    """The facts of an opened slide, as shown in the Slide panel and ``info``."""

    name: str
    path: str | None
    backend: str
    vendor: str
    width: int
    height: int
    levels: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    tile_sizes: tuple[tuple[int, int], ...]
    mpp_x: float | None
    mpp_y: float | None
    mpp_source: str
    mpp_note: str
    objective_power: float | None
    associated_images: tuple[str, ...] = field(default_factory=tuple)
    brightfield: bool | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def size_mm(self) -> tuple[float, float] | None:
        """Physical ``(width, height)`` in millimetres, None without um/px."""
        if self.mpp_x is None or self.mpp_y is None:
            return None
        return self.width * self.mpp_x / 1000.0, self.height * self.mpp_y / 1000.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (tuples become lists)."""
        data = asdict(self)
        data["level_dimensions"] = [list(d) for d in self.level_dimensions]
        data["level_downsamples"] = list(self.level_downsamples)
        data["tile_sizes"] = [list(t) for t in self.tile_sizes]
        data["associated_images"] = list(self.associated_images)
        data["warnings"] = list(self.warnings)
        return data


class Slide:
    """An opened whole-slide image: facts, region reads and a lazy dask pyramid.

    Parameters
    ----------
    backend : SlideBackend
        The reader that provides pixels.
    mpp : float, optional
        A user-given um/px that overrides (or supplies) the file's value.

    Examples
    --------
    >>> from napari_pathology.slide import InMemoryBackend, Slide
    >>> import numpy as np
    >>> slide = Slide(InMemoryBackend([np.zeros((512, 768, 3), np.uint8)], mpp=0.5))
    >>> slide.info().width, slide.pyramid()[0].shape
    (768, (512, 768, 3))

    """

    def __init__(self, backend: SlideBackend, mpp: float | None = None) -> None:
        self.backend = backend
        self._mpp_override: float | None = None
        self._pyramid: list[da.Array] | None = None
        self._brightfield: tuple[bool | None, str] | None = None
        #: The settings file whose remembered um/px :func:`open_slide` applied, if any.
        self.mpp_restored_from: Path | None = None
        #: Problems met while opening that are not the file's (an unusable settings file).
        self.notes: list[str] = []
        if mpp is not None:
            self.set_mpp(mpp)

    # ------------------------------------------------------------------ facts
    @property
    def path(self) -> str | None:
        """Path of the file (None for in-memory slides)."""
        return self.backend.path

    @property
    def name(self) -> str:
        """File name, or a description of an in-memory slide."""
        return Path(self.path).name if self.path else f"<{self.backend.name} slide>"

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.backend.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in pixels."""
        return self.backend.level_dimensions[0]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """``(width, height)`` of every level."""
        return self.backend.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample factor of every level relative to level 0."""
        return self.backend.level_downsamples

    @property
    def mpp(self) -> tuple[float, float] | None:
        """Level-0 ``(mpp_x, mpp_y)`` in micrometres per pixel, or None when unknown."""
        if self._mpp_override is not None:
            return self._mpp_override, self._mpp_override
        return self.backend.mpp

    @property
    def mpp_source(self) -> str:
        """``"file"``, ``"user"`` (set with :meth:`set_mpp`) or ``"missing"``."""
        if self._mpp_override is not None:
            return "user"
        return "file" if self.backend.mpp else "missing"

    def set_mpp(self, mpp: float | None) -> None:
        """Override the file's um/px (``None`` goes back to the file's value).

        Raises
        ------
        ValueError
            For a value that is not a positive finite number within
            :data:`~napari_pathology.slide.backends.PLAUSIBLE_MPP`.

        """
        if mpp is not None and (not math.isfinite(mpp) or mpp <= 0):
            raise ValueError(f"um/px must be a positive number, got {mpp!r}")
        low, high = PLAUSIBLE_MPP
        if mpp is not None and not low <= mpp <= high:
            raise ValueError(
                f"um/px of {self.name} must be between {low:g} and {high:g} (what slide scanners and "
                f"microscopes give), got {mpp!r}"
            )
        self._mpp_override = None if mpp is None else float(mpp)

    def require_mpp(self) -> tuple[float, float]:
        """The um/px, or a clear error telling the user how to supply it."""
        if self.mpp is None:
            raise SlideOpenError(
                f"{self.name} has no um/px ({self.backend.mpp_note}); set it in the Slide panel or pass --mpp"
            )
        return self.mpp

    @property
    def warnings(self) -> tuple[str, ...]:
        """Problems found in the file that did not stop it from opening (missing levels...)."""
        return (*getattr(self.backend, "warnings", ()), *self.notes)

    @property
    def brightfield(self) -> bool | None:
        """True for a brightfield (H&E-like) slide, False for a fluorescence / dark-field one.

        Judged once from a small low-resolution read (see :func:`judge_brightfield`)
        and from OME metadata; None when the slide is blank or unreadable.
        """
        if self._brightfield is None:
            self._brightfield = _slide_brightfield(self)
        return self._brightfield[0]

    def require_brightfield(self, coarsest: np.ndarray | None = None) -> None:
        """Refuse a fluorescence (dark-field) slide for the H&E models and tissue masks.

        Parameters
        ----------
        coarsest : ndarray, optional
            The whole coarsest level as RGB, when the caller has read it already: the first
            judgement uses it instead of reading the level again.

        Raises
        ------
        NotBrightfieldError
            When :attr:`brightfield` is False; the message names the slide and why.

        """
        if self._brightfield is None and coarsest is not None:
            self._brightfield = _slide_brightfield(self, coarsest)
        if self.brightfield is False:
            reason = self._brightfield[1] if self._brightfield else ""
            raise NotBrightfieldError(
                f"{self.name} looks like a fluorescence (dark-field) slide ({reason}): the H&E models and "
                "tissue masks do not apply"
            )

    def info(self) -> SlideInfo:
        """The slide's facts."""
        b = self.backend
        mpp = self.mpp
        note = "set by the user" if self.mpp_source == "user" else b.mpp_note
        return SlideInfo(
            name=self.name,
            path=self.path,
            backend=b.name,
            vendor=b.vendor,
            width=self.dimensions[0],
            height=self.dimensions[1],
            levels=self.level_count,
            level_dimensions=tuple(b.level_dimensions),
            level_downsamples=tuple(round(d, 6) for d in b.level_downsamples),
            tile_sizes=tuple(b.tile_sizes),
            mpp_x=mpp[0] if mpp else None,
            mpp_y=mpp[1] if mpp else None,
            mpp_source=self.mpp_source,
            mpp_note=note,
            objective_power=b.objective_power,
            associated_images=tuple(b.associated_image_names),
            brightfield=self.brightfield,
            warnings=self.warnings,
        )

    # ------------------------------------------------------------------ pixels
    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Read ``(height, width, 3)`` RGB uint8 at ``level`` and level coordinates ``(x, y)``."""
        return self.backend.read_region(level, x, y, width, height)

    def read_associated_image(self, name: str) -> np.ndarray:
        """Read an associated image (``label``, ``macro``, ``thumbnail``...)."""
        return self.backend.read_associated_image(name)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The highest-resolution level not finer than ``downsample`` needs.

        A small tolerance accepts levels whose factor is a hair above the
        request (e.g. 4.016 for 4).
        """
        best = 0
        for level, factor in enumerate(self.level_downsamples):
            if factor <= downsample * 1.01:
                best = level
        return best

    def validate(self) -> None:
        """Decode the first and last tile of every level to prove the pixel data is readable.

        A lower level that cannot be decoded is dropped (the viewer computes
        its resolution from the levels that remain) and named in
        :attr:`warnings`.

        Raises
        ------
        SlideReadError
            When tiles of the full-resolution level cannot be decoded.

        """
        bad: dict[int, SlideReadError] = {}
        for level in range(self.level_count):
            width, height = self.level_dimensions[level]
            tile_w, tile_h = self.backend.tile_sizes[level]
            tile_w, tile_h = max(1, min(width, tile_w)), max(1, min(height, tile_h))
            last_x, last_y = (width - 1) // tile_w * tile_w, (height - 1) // tile_h * tile_h
            try:
                self.read_region(level, 0, 0, tile_w, tile_h)
                last_w, last_h = min(tile_w, width - last_x), min(tile_h, height - last_y)
                self.read_region(level, last_x, last_y, last_w, last_h)
            except SlideReadError as exc:
                if level == 0:
                    raise
                bad[level] = exc
        if bad:
            drop = getattr(self.backend, "drop_levels", None)
            try:
                if drop is None:
                    raise NotImplementedError
                drop(set(bad), "cannot be decoded")
            except NotImplementedError:
                raise next(iter(bad.values())) from None
            self._pyramid = None

    def pyramid(self, on_error: Callable[[SlideReadError], None] | None = None) -> list[da.Array]:
        """Every level as a lazy ``(height, width, 3)`` uint8 dask array.

        Chunks follow the file's own tile grid (several tiles per chunk when
        tiles are smaller than 256 px), and building the arrays reads no pixel.

        Parameters
        ----------
        on_error : callable, optional
            Without it, an undecodable tile raises :class:`SlideReadError` at
            compute time. With it, the error is passed to ``on_error`` and the
            chunk is filled with grey, so a viewer keeps working on a partly
            corrupt file.

        Returns
        -------
        list of dask.array.Array
            Level 0 first.

        """
        if on_error is None and self._pyramid is not None:
            return self._pyramid
        levels = [file_level(self.backend, self.name, level, on_error) for level in range(self.level_count)]
        levels += computed_levels(self.backend, self.name, on_error)
        if on_error is None:
            self._pyramid = levels
        return levels

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the file."""
        self.backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        mpp = f"{self.mpp[0]:.3g} um/px" if self.mpp else "no um/px"
        return f"<Slide {self.name} {w}x{h} {self.level_count} levels {mpp} via {self.backend.name}>"


# --------------------------------------------------------------------------- opening


def open_slide(path: str | Path, *, mpp: float | None = None, remembered: bool = True) -> Slide:
    """Open a whole-slide image or plain image with the first backend that reads it.

    Reads only headers: no pixel is decoded.

    Parameters
    ----------
    path : str or Path
        SVS, NDPI, MRXS, SCN, VMS/VMU, BIF, generic tiled TIFF, DICOM WSI,
        OME-TIFF and other TIFF, PNG or JPEG.
    mpp : float, optional
        um/px to use instead of (or in the absence of) the file's own.
    remembered : bool
        Without ``mpp``, use the um/px the user set for this slide earlier (kept
        by :mod:`napari_pathology.slide.settings`); :attr:`Slide.mpp_restored_from`
        then names the settings file, and a settings file that cannot be used is
        named in :attr:`Slide.warnings`.

    Returns
    -------
    Slide

    Raises
    ------
    UnsupportedFormatError
        When no backend reads this kind of file.
    SlideOpenError
        When the file is of a supported kind but broken, with the cause.

    """
    path = Path(path)
    if not path.exists():
        raise SlideOpenError(f"Cannot open {path.name}: no such file ({path})")
    if path.is_dir():
        raise UnsupportedFormatError(f"Cannot open {path.name}: it is a folder, not a slide file")
    if not is_supported_path(path):
        raise UnsupportedFormatError(
            f"Cannot open {path.name}: unsupported file type {path.suffix!r} "
            f"(supported: {', '.join(SUPPORTED_SUFFIXES)})"
        )
    try:  # a FIFO, socket or device would block (or stream) forever in any backend
        require_regular_file(path, "slide file")
    except (OSError, ValueError) as exc:
        raise UnsupportedFormatError(f"Cannot open {path.name}: {exc}") from None
    if path.stat().st_size == 0:
        raise SlideOpenError(f"Cannot open {path.name}: the file is empty (0 bytes)")
    backend = _open_backend(path)
    try:
        _check_file_levels(backend, path)
        _check_pyramid(backend)
    except BaseException:
        backend.close()
        raise
    slide = Slide(backend, mpp=mpp)
    if mpp is None and remembered:
        _restore_mpp(slide, path)
    return slide


def _restore_mpp(slide: Slide, path: Path) -> None:
    """Apply the um/px the user set for this slide earlier, if any (see :mod:`.settings`)."""
    from napari_pathology.slide.settings import remembered_mpp

    value, where, problem = remembered_mpp(path)
    if value is not None:
        try:
            slide.set_mpp(value)
            slide.mpp_restored_from = where
        except ValueError as exc:
            problem = f"the um/px kept in {where} was not used: {exc}"
    if problem:
        slide.notes.append(problem)


def _check_file_levels(backend: SlideBackend, path: Path) -> None:
    """For TIFF-based files read by OpenSlide: find levels whose tiles lie past the end of the file."""
    if not isinstance(backend, OpenSlideBackend):
        return
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError:
        return
    if magic not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return
    import tifffile

    with quiet_tifffile() as logged:
        try:
            with tifffile.TiffFile(path) as tif:
                damaged = tiff_damage(tif, path.stat().st_size)
        except Exception:  # OpenSlide read it; tifffile's opinion is only advice here
            return
    bad = {level for level, dims in enumerate(backend.level_dimensions) if dims in damaged}
    if 0 in bad:
        missing, total = damaged[backend.level_dimensions[0]]
        w, h = backend.level_dimensions[0]
        raise SlideOpenError(
            f"Cannot open {path.name}: the file is truncated ({missing} of {total} tiles of the {w}x{h} px "
            f"full-resolution level lie past its end at {path.stat().st_size:,} bytes); "
            "copy or download it again"
        )
    backend.drop_levels(bad, "lie past the end of the truncated file")
    if any("invalid page offset" in m for m in logged):
        backend.warnings.append(
            f"{path.name} is truncated or damaged: images stored after its last readable page are missing"
        )


def _open_backend(path: Path) -> SlideBackend:
    lower = path.name.lower()
    if lower.endswith(IMAGE_SUFFIXES):
        return ImageBackend(path)
    is_tiff = lower.endswith(TIFF_SUFFIXES)
    if is_tiff and _tiff_needs_tifffile(path):
        return TiffBackend(path)
    import openslide

    try:
        detected = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # unreadable file: fall through to the clear message below
        detected = None
    if detected is not None:
        try:
            return OpenSlideBackend(path)
        except SlideOpenError as openslide_error:
            if not is_tiff:
                raise
            try:
                return TiffBackend(path)
            except SlideOpenError:
                raise openslide_error from None
    if is_tiff:
        return TiffBackend(path)
    raise SlideOpenError(
        f"Cannot open {path.name}: OpenSlide does not recognise its contents "
        f"(a {path.suffix} file that is corrupt, truncated or not really {path.suffix})"
    )


def _tiff_needs_tifffile(path: Path) -> bool:
    """OME-TIFF and SubIFD pyramids read better with tifffile than OpenSlide."""
    import tifffile

    try:
        with quiet_tifffile(), tifffile.TiffFile(path) as tif:
            if tif.is_ome:
                return True
            first = tif.pages.first
            return bool(first.subifds) and len(tif.series[0].levels) > 1
    except Exception:
        return False  # let OpenSlide (or the error path) explain the problem
