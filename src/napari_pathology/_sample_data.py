"""napari sample data: synthetic H&E slides with planted tumour (File > Open Sample)."""

from __future__ import annotations

from napari_pathology._layers import LayerData, slide_layer_data
from napari_pathology.demo import SAMPLE_SIZE, demo_slide
from napari_pathology.slide import open_slide


def _sample(negative: bool) -> list[LayerData]:
    path = demo_slide(SAMPLE_SIZE, seed=3, negative=negative)
    data, kwargs, layer_type = slide_layer_data(open_slide(path))
    kwargs["name"] = "synthetic normal" if negative else "synthetic tumour"
    return [(data, kwargs, layer_type)]


def synthetic_tumour_slide() -> list[LayerData]:
    """A cached 8k x 8k synthetic slide at 0.5 um/px with tumour regions."""
    return _sample(negative=False)


def synthetic_normal_slide() -> list[LayerData]:
    """A cached 8k x 8k synthetic tumour-free slide at 0.5 um/px."""
    return _sample(negative=True)
