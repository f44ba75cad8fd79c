"""The ``wholeslide`` family's core: Chen et al. 2021's whole-slide CNN and its exact tiled training.

The network (a ResNet with frozen BatchNorm, global max pooling and a
linear head) and its registered spec are in :mod:`.model`; which input crop
each tile needs (the layers' receptive spans, sizes, stride) in
:mod:`.tiling`; the exact tile-by-tile forward and backward passes that
bound the memory of a training step by the tile, the tile chooser from a
memory budget and the tile-by-tile class activation maps in
:mod:`.streaming`; the settings and the trainer on a slide table in
:mod:`.train`. Not yet a registered family (no ``Family`` subclass here).
No Qt, no napari.
"""

from __future__ import annotations
