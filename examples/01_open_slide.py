"""Open a whole-slide image, print its facts and read a few regions.

Usage::

    python examples/01_open_slide.py [SLIDE]

Without SLIDE it uses the cached demo slide (made on first use).
"""

from __future__ import annotations

import sys

import numpy as np

from napari_pathology.demo import demo_slide
from napari_pathology.slide import open_slide

path = sys.argv[1] if len(sys.argv) > 1 else demo_slide(size=8192, seed=3)
slide = open_slide(path)
info = slide.info()
print(slide)
print(f"vendor {info.vendor}, read by {info.backend}")
print(f"{info.width} x {info.height} px in {info.levels} levels, downsamples {info.level_downsamples}")
print(f"um/px: {info.mpp_x} ({info.mpp_note})   size: {info.size_mm} mm")
print(f"associated images: {', '.join(info.associated_images) or 'none'}")

# One region at full resolution from the middle of the slide ...
width, height = slide.dimensions
region = slide.read_region(0, width // 2 - 256, height // 2 - 256, 512, 512)
print(f"level-0 region {region.shape}, mean RGB {region.reshape(-1, 3).mean(0).round(1)}")

# ... and the whole slide at its lowest resolution, through the lazy dask pyramid.
pyramid = slide.pyramid()
thumbnail = np.asarray(pyramid[-1])
print(f"pyramid shapes: {[level.shape for level in pyramid]}")
print(f"lowest level {thumbnail.shape}: {(thumbnail.min(axis=2) < 200).mean():.0%} of pixels are not white")
