"""Procedurally generated H&E-like whole-slide images with exact ground truth.

:func:`generate_synthetic_slide` writes a pyramidal, tiled, JPEG-compressed
TIFF that OpenSlide opens as ``generic-tiff`` (level 0 first, then each 2x
reduced level as its own top-level page), plus sidecar files with the ground
truth beside it (for ``OUT.tif``):

``OUT.truth.json``
    Label, tumour type, geometry, counts and generator options.
``OUT.tumour.geojson``
    QuPath-style tumour annotations in level-0 pixel coordinates.
``OUT.tissue.png`` / ``OUT.tumour.png``
    Boolean masks (0/255) at ``mask_mpp`` um/px.
``OUT.nuclei.csv``
    Every rendered nucleus: ``x_um,y_um,label,radius_um,kind``.

Tumour types
------------
A slide with tumour has one of :data:`TUMOUR_TYPES`: ``A`` (the default and
the generator's original tumour, whose pixels never change: crowded
hyperchromatic nuclei in nests between desmoplastic septa, nucleus kind
``tumour``) or ``B`` (solid sheets of large pleomorphic vesicular nuclei with
prominent nucleoli and abundant eosinophilic cytoplasm, at about half A's
density, kind ``tumour_b``). Both kinds are labelled ``tumour`` in the nucleus
table (:data:`TUMOUR_KINDS`). The truth JSON records ``tumour_type`` (None on
a normal slide) at the top level and per lesion; :func:`slide_label` turns the
truth into a slide-table label, :data:`SUBTYPE_LABELS` (``normal``,
``tumour_a``, ``tumour_b``) or :data:`BINARY_LABELS` (``normal``, ``tumour``),
and :func:`write_subtype_cohort` writes N slides of each subtype class with
their slide table. Everything but the tumour is the same for types A and B of
one seed.

How it works
------------
All regions (tissue, tumour, lymphoid aggregates, epithelium, fat, pen ink,
out-of-focus patch) are smooth fields sampled on the mask grid (one node per
mask pixel centre) in approximately signed micrometres. The same bilinear
interpolation of these fields is used to colour pixels, to label nuclei, to
write the PNG masks (the field at the nodes) and to trace the polygons (the
zero contour), so all ground truth agrees. Nuclei are placed once for the
whole slide (jittered lattices and Poisson points in micrometres) and splatted
per block, fibre and chromatin textures are periodic and sampled by global
pixel coordinates, so blocks rendered in any order by any thread are seamless
and the output is deterministic for a given set of arguments.

Colour follows Beer-Lambert: ``RGB = 255 * exp(-(H * h + E * e + ...))`` with
per-slide random stain vectors and intensities.

Modules
-------
``fields``   the mask grid and the region fields (tissue, tumour, glands, pen, blur)
``textures`` periodic fibre, chromatin, mottle and fat textures
``nuclei``   nucleus kinds, shape parameters and placement
``scene``    everything a block renderer needs, built once per slide
``render``   level-0 blocks to RGB
``truth``    the ground-truth sidecar files (paths, reading, writing)
``writer``   the streamed pyramidal TIFF and the public entry points
``cohort``   a small subtyping cohort (N slides per class) and its slide table
"""

# private names re-exported for tests that rebuild the generator's own fields
from napari_pathology.slide.synthetic.cohort import generate_subtype_cohort, write_subtype_cohort
from napari_pathology.slide.synthetic.fields import _F_PEN as _F_PEN
from napari_pathology.slide.synthetic.nuclei import NUCLEUS_KINDS, TUMOUR_KINDS
from napari_pathology.slide.synthetic.scene import _build_scene as _build_scene
from napari_pathology.slide.synthetic.truth import (
    BINARY_LABELS,
    GENERATOR,
    SUBTYPE_LABELS,
    TUMOUR_TYPES,
    SyntheticTruth,
    check_tumour_type,
    load_truth,
    slide_label,
    truth_paths,
)
from napari_pathology.slide.synthetic.writer import generate_synthetic_slide, write_synthetic_slide

__all__ = [
    "BINARY_LABELS",
    "GENERATOR",
    "NUCLEUS_KINDS",
    "SUBTYPE_LABELS",
    "TUMOUR_KINDS",
    "TUMOUR_TYPES",
    "SyntheticTruth",
    "check_tumour_type",
    "generate_subtype_cohort",
    "generate_synthetic_slide",
    "load_truth",
    "slide_label",
    "truth_paths",
    "write_subtype_cohort",
    "write_synthetic_slide",
]
