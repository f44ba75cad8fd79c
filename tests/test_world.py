"""One home for the half-pixel: heatmap cells, mask pixels and points sit on the slide pixels under them."""

from __future__ import annotations

import numpy as np
import pytest

from napari_pathology._layers import overlay_geometry, slide_layer_data
from napari_pathology.slide import InMemoryBackend, Slide
from napari_pathology.tiles import make_tile_grid
from napari_pathology.world import pixel_centre_um, um_from_world, world_from_um


def _slide_layer(mpp: tuple[float, float]):
    from napari.layers import Image

    slide = Slide(InMemoryBackend([np.zeros((96, 128, 3), np.uint8)], mpp=mpp))
    data, kwargs, _ = slide_layer_data(slide)
    kwargs.pop("units", None)
    return Image(data, **kwargs), slide  # the slide layer as the reader makes it


def _corner(layer, data_yx) -> np.ndarray:
    """World ``(y, x)`` of the top-left corner of data pixel ``data_yx`` (napari centres pixel i at i)."""
    return np.asarray(layer.data_to_world(np.asarray(data_yx, float) - 0.5))[-2:]


@pytest.mark.parametrize("mpp", [(0.5, 0.5), (0.25, 0.4)])
def test_a_heatmap_cell_covers_the_slide_pixels_under_it(mpp) -> None:
    from napari.layers import Image

    slide_layer, slide = _slide_layer(mpp)
    grid = make_tile_grid(slide, 2.0, 16, stride=8)  # tiles of 32 um, cells of 16 um centred in them
    heatmap = Image(
        np.zeros(grid.shape, np.float32), **overlay_geometry(grid.cell_um, grid.first_centre_um, mpp)
    )
    for r, c in ((0, 0), (1, 2), (2, 1)):
        # cell (r, c) stands for the physical square centred on its tile's centre, cell_um wide
        centre_y = pixel_centre_um(r, grid.cell_um) + grid.first_centre_um[0] - grid.cell_um / 2
        centre_x = pixel_centre_um(c, grid.cell_um) + grid.first_centre_um[1] - grid.cell_um / 2
        top, left = centre_y - grid.cell_um / 2, centre_x - grid.cell_um / 2
        # the slide pixel whose top-left corner is that square's: physical um / mpp
        pixel_yx = (top / mpp[1], left / mpp[0])
        np.testing.assert_allclose(_corner(heatmap, (r, c)), _corner(slide_layer, pixel_yx), atol=1e-9)
        # and the centre of the cell is the world position of its physical centre
        np.testing.assert_allclose(
            heatmap.data_to_world((r, c))[-2:], world_from_um((centre_x, centre_y), mpp)[0], atol=1e-9
        )


def test_a_mask_pixel_and_a_nucleus_sit_on_their_slide_pixels() -> None:
    from napari.layers import Image

    mpp = (0.5, 0.5)
    slide_layer, _ = _slide_layer(mpp)
    mask_mpp = 4.0  # one mask pixel = 8 x 8 slide pixels
    mask = Image(np.zeros((12, 16), bool), **overlay_geometry(mask_mpp, (mask_mpp / 2, mask_mpp / 2), mpp))
    np.testing.assert_allclose(_corner(mask, (2, 3)), _corner(slide_layer, (16, 24)), atol=1e-9)
    # a nucleus at the centre of slide pixel (y 5, x 7) is drawn where napari draws that pixel's centre
    xy_um = (pixel_centre_um(7, mpp[0]), pixel_centre_um(5, mpp[1]))
    np.testing.assert_allclose(
        world_from_um(xy_um, mpp)[0], slide_layer.data_to_world((5, 7))[-2:], atol=1e-12
    )
    np.testing.assert_allclose(um_from_world(world_from_um(xy_um, mpp), mpp)[0], xy_um)
    # in pixels (no um/px) the shift is half a pixel
    np.testing.assert_allclose(world_from_um((3.5, 2.5), None), [[2.0, 3.0]])
