"""The whole-slide CNN's input: a slide's tissue at the training um/px, read region by region, cached on disk.

A slide enters the network as one uint8 RGB image at ``mpp`` um/px: its
tissue's bounding box (found at low resolution by the tissue detector,
:func:`napari_pathology.tissue.detect_tissue`, as the slide runner's; or the whole slide), read
from the pyramid's best level region by region
(:func:`napari_pathology.tissue.read_at_mpp`, an exact area average), and
optionally padded with white (centred) or centre-cropped to a fixed square
side. Memory holds that uint8 image (3 bytes a pixel; never a float copy,
never the pyramid level whole): normalisation happens per tile on the
device (:func:`napari_pathology.tiles.tensors.normalize_uint8`).

:class:`SlideImages` keeps each image as a ``.npy`` file in a cache folder
(written atomically, read memory-mapped), so after the first epoch a slide
is one sequential file read instead of decoding and resampling its pyramid
tiles; past the cache's size limit slides are read from the pyramid again
each time. Augmentations (:func:`augment`: 90 degree rotations, flips,
brightness and contrast through a 256-entry lookup table) work on the uint8
image. No Qt, no napari.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from napari_pathology.families.wholeslide.model import TOTAL_STRIDE
from napari_pathology.slide.backends.errors import SlideOpenError

__all__ = [
    "SlideBox",
    "SlideImages",
    "SlideInputError",
    "as_tensor",
    "augment",
    "cache_folder",
    "locate_slide",
]

#: Bumped when the cached images' content changes meaning (cache keys include it).
CACHE_VERSION = 1


class SlideInputError(ValueError):
    """A slide that cannot be a training input: no um/px, unreadable, no tissue. The message names it."""


@contextlib.contextmanager
def _named_errors(path: Path) -> Iterator[None]:
    """Any failure to open or read the slide at ``path`` as a :class:`SlideInputError` naming it."""
    try:
        yield
    except SlideInputError:
        raise
    except SlideOpenError as error:  # no um/px, unreadable pixels: the backend's message names the slide
        raise SlideInputError(str(error)) from None
    except (OSError, ValueError) as error:
        raise SlideInputError(f"{path.name}: {error}") from None


@dataclass(frozen=True)
class SlideBox:
    """Where a slide's input lies: ``path`` and its box ``(r0, r1, c0, c1)`` in px at ``mpp``.

    ``slide_mpp`` is the um/px the slide table gave the slide (None: the file's own).
    """

    path: Path
    mpp: float
    box: tuple[int, int, int, int]
    slide_mpp: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the box."""
        return self.box[1] - self.box[0], self.box[3] - self.box[2]


def locate_slide(
    path: Path, mpp: float, *, crop_to_tissue: bool = True, slide_mpp: float | None = None
) -> SlideBox:
    """Open a slide and find its input box at ``mpp`` (the tissue's bounding box, or the whole slide).

    The box starts at a multiple of the network's stride, as the slide runner's does.

    Raises
    ------
    SlideInputError
        No um/px, a file that cannot be read, or no tissue (naming the slide and what to do).
    """
    from napari_pathology.progress import run_to_completion
    from napari_pathology.slide.slide import open_slide
    from napari_pathology.tissue import detect_tissue
    from napari_pathology.tissue.mask import _mask_shape

    path = Path(path)
    with _named_errors(path), open_slide(path, mpp=slide_mpp) as slide:
        shape = _mask_shape(slide.dimensions, slide.require_mpp(), mpp)
        box = (0, shape[0], 0, shape[1])
        if crop_to_tissue:
            mask = run_to_completion(detect_tissue(slide))
            found = mask.bounding_box(mpp, shape, snap=TOTAL_STRIDE)
            if found is None:
                raise SlideInputError(
                    f"{path.name}: no tissue found; remove it from the table or turn crop_to_tissue off"
                )
            box = found
        return SlideBox(path, float(mpp), box, slide_mpp)


def _placement(length: int, size: int | None) -> tuple[int, int, int]:
    """``(skip, take, offset)``: read ``take`` px from ``skip`` into the box, at ``offset`` in the output."""
    if size is None:
        return 0, length, 0
    if length <= size:
        return 0, length, (size - length) // 2
    return (length - size) // 2, size, 0


def _read(where: SlideBox, size: int | None, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (white, the box's pixels placed as :func:`_placement` says) from the slide's pyramid."""
    from napari_pathology.progress import run_to_completion
    from napari_pathology.slide.slide import open_slide
    from napari_pathology.tissue import read_at_mpp

    r0, _r1, c0, _c1 = where.box
    (sr, tr, orow), (sc, tc, ocol) = (_placement(n, size) for n in where.shape)
    box = (r0 + sr, r0 + sr + tr, c0 + sc, c0 + sc + tc)
    out[:] = 255
    with _named_errors(where.path), open_slide(where.path, mpp=where.slide_mpp) as slide:
        window = out[orow : orow + tr, ocol : ocol + tc]
        run_to_completion(read_at_mpp(slide, where.mpp, box=box, out=window, max_pixels=None))
    return out


class SlideImages:
    """Each slide's input image (uint8 ``(H, W, 3)``), read once from its pyramid and kept on disk.

    Parameters
    ----------
    size : int, optional
        Pad with white (centred) or centre-crop every image to ``size`` x ``size``; none: the box as it is.
    cache_dir : Path, optional
        Folder of the cached images (``<key>.npy``); none: no cache.
    cache_bytes : int
        The cache's size limit; a slide that would pass it is read from the pyramid every time.
    """

    def __init__(self, size: int | None = None, cache_dir: Path | None = None, cache_bytes: int = 0) -> None:
        self.size = size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cache_bytes = int(cache_bytes)
        self.pyramid_reads = 0
        self.cache_reads = 0

    def shape(self, where: SlideBox) -> tuple[int, int]:
        """``(rows, cols)`` of the image of ``where``."""
        if self.size is not None:
            return self.size, self.size
        return where.shape

    def _key(self, where: SlideBox) -> str:
        stat = where.path.stat()
        text = json.dumps(
            [str(where.path.resolve()), stat.st_size, stat.st_mtime_ns, where.mpp, where.box, self.size,
             where.slide_mpp, CACHE_VERSION]
        )  # fmt: skip
        return hashlib.sha1(text.encode()).hexdigest()[:20]

    def cached_bytes(self) -> int:
        """Bytes of the images in the cache folder."""
        if self.cache_dir is None or not self.cache_dir.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.cache_dir.glob("*.npy"))

    def image(self, where: SlideBox) -> np.ndarray:
        """The slide's input image (writable: cached images are mapped copy-on-write).

        Raises
        ------
        SlideInputError
            The slide cannot be read (naming it).
        """
        from napari_pathology.fileio import atomic_path

        rows, cols = self.shape(where)
        if self.cache_dir is None:
            self.pyramid_reads += 1
            return _read(where, self.size, np.empty((rows, cols, 3), np.uint8))
        path = self.cache_dir / f"{self._key(where)}.npy"
        if path.is_file():
            try:
                image = np.load(path, mmap_mode="c")
                if image.shape == (rows, cols, 3) and image.dtype == np.uint8:
                    self.cache_reads += 1
                    return image
            except (OSError, ValueError):
                pass  # a damaged file: read the slide again below
            path.unlink(missing_ok=True)
        self.pyramid_reads += 1
        if self.cached_bytes() + rows * cols * 3 > self.cache_bytes:
            return _read(where, self.size, np.empty((rows, cols, 3), np.uint8))
        with atomic_path(path, suffix=".npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(rows, cols, 3))
            _read(where, self.size, out)
            out.flush()
            del out
        return np.load(path, mmap_mode="c")


def augment(
    image: np.ndarray, rng: np.random.Generator, *, rotations: bool, flips: bool, colour: float
) -> np.ndarray:
    """A randomly rotated (90 degree steps), flipped and colour-jittered uint8 copy of ``image``.

    Brightness and contrast act on every pixel value alike
    (``((v / 255 - 0.5) * contrast + 0.5 + brightness)``, clipped), so they run
    as a 256-entry lookup table on the uint8 image.
    """
    view = image
    if rotations:
        view = np.rot90(view, int(rng.integers(4)))
    if flips and rng.random() < 0.5:
        view = view[:, ::-1]
    if flips and rng.random() < 0.5:
        view = view[::-1]
    if colour > 0:
        contrast = 1.0 + rng.uniform(-colour, colour)
        brightness = rng.uniform(-colour, colour)
        values = (np.arange(256) / 255.0 - 0.5) * contrast + 0.5 + brightness
        table = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
        return table[view]
    return np.ascontiguousarray(view)


def as_tensor(image: np.ndarray) -> torch.Tensor:
    """``(1, 3, H, W)`` uint8 view of an ``(H, W, 3)`` image (no copy)."""
    return torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)


def cache_folder(out: Path, cache_dir: Path | None) -> Path:
    """A training job's cache folder: ``cache_dir``, else ``<out stem>.slides-cache`` beside the model."""
    return Path(cache_dir) if cache_dir is not None else Path(out).with_name(f"{Path(out).stem}.slides-cache")
