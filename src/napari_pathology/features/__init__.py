"""Feature extraction as its own stage: encoders, the per-slide feature cache, CLAM-layout files.

- :mod:`.encoders`: the encoder registry (:func:`register_encoder`,
  :func:`get_encoder`, :func:`list_encoders`) and the rules for weights on disk
  (a path, or torch's own cache; never a download).
- :mod:`.backbones`: the built-in encoders: ``resnet50-trunc`` (CLAM's
  ResNet-50 truncated after layer 3, 1024-d) and ``torchvision:<model>``.
  Model families register their own encoders from their folders.
- :mod:`.extract`: :func:`extract_features`, per slide x encoder x grid,
  cached as zarr, resumable, read in threads, batched, yielding progress.
- :mod:`.clam_h5`: :func:`write_clam_h5` / :func:`read_clam_h5`, CLAM's
  ``features`` + ``coords`` HDF5 layout.

No Qt, no napari.

Examples
--------
>>> from napari_pathology.features import get_encoder, extract_features  # doctest: +SKIP
>>> encoder = get_encoder("resnet50-trunc", device="auto")  # doctest: +SKIP
>>> feats = run_to_completion(extract_features(slide, encoder, tissue=mask))  # doctest: +SKIP
>>> write_clam_h5("out/slide.h5", feats.features, feats.coords, *feats.clam_patch())  # doctest: +SKIP
"""

from napari_pathology.features import backbones as _backbones  # noqa: F401  (registers the built-ins)
from napari_pathology.features.clam_h5 import ClamFeatures, read_clam_h5, write_clam_h5
from napari_pathology.features.encoders import (
    Encoder,
    EncoderEntry,
    EncoderError,
    get_encoder,
    list_encoders,
    load_state_dict,
    load_weights_into,
    register_encoder,
    register_encoder_prefix,
    torch_cache_dir,
)
from napari_pathology.features.extract import (
    FeatureBatch,
    SlideFeatures,
    extract_features,
    feature_grid,
    level0_coords,
)

__all__ = [
    "ClamFeatures",
    "Encoder",
    "EncoderEntry",
    "EncoderError",
    "FeatureBatch",
    "SlideFeatures",
    "extract_features",
    "feature_grid",
    "get_encoder",
    "level0_coords",
    "list_encoders",
    "load_state_dict",
    "load_weights_into",
    "read_clam_h5",
    "register_encoder",
    "register_encoder_prefix",
    "torch_cache_dir",
    "write_clam_h5",
]
