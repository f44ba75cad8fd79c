"""Patch features for CLAM: one slide into a CLAM-layout h5 file, and a slide table's missing files.

The feature files themselves are written and read by
:mod:`napari_pathology.features.slide_files` (``write_features_h5``,
``extract_to_h5``, ``h5_encoder``, re-exported here).
:func:`prepare_bags` is the trainer's stage: every existing file of a table
checked against the encoder of the settings (attributes only), the missing
ones extracted slide by slide, and what the trained model's spec must record
so that Run extracts the same features. No Qt, no napari.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_pathology.families.clam.bags import bag_path
from napari_pathology.features.slide_files import extract_to_h5, feature_attrs, h5_encoder, write_features_h5
from napari_pathology.progress import Progress
from napari_pathology.training.events import TrainEvent, TrainingError

__all__ = [
    "FeatureSource",
    "extract_to_h5",
    "feature_attrs",
    "h5_encoder",
    "prepare_bags",
    "write_features_h5",
]

#: Seconds between two relayed progress lines of one slide's extraction.
_RELAY_SECONDS = 2.0


@dataclass
class FeatureSource:
    """The features a CLAM model is trained on: what its spec records so that Run extracts the same.

    Attributes
    ----------
    encoder : str
        Registered encoder name.
    weights : str or None
        The encoder's weights (a file or a registered model name); None: its default.
    patch_size : int or None
        Patch side in px at ``mpp`` (None: not known from the files or the registry).
    mpp : float or None
        um/px of the patches.
    normalization : str or None
        The encoder's input normalisation.
    provenance : dict
        The encoder's provenance (weights digest, trained) as the files or the encoder record it.
    extracted : list of str
        Slides whose features this job extracted.
    stopped : str
        Why extraction stopped ("" when it did not).
    """

    encoder: str
    weights: str | None = None
    patch_size: int | None = None
    mpp: float | None = None
    normalization: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    extracted: list[str] = field(default_factory=list)
    stopped: str = ""

    def spec_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~napari_pathology.families.clam.model.clam_spec` for these features."""
        out: dict[str, Any] = {"encoder": self.encoder, "encoder_weights": self.weights}
        if self.patch_size is not None:
            out["input_size"] = int(self.patch_size)
        if self.mpp is not None:
            out["mpp"] = float(self.mpp)
        if self.normalization is not None:
            out["normalization"] = self.normalization
        return out


def _registered(name: str) -> Any:
    """The registry's entry of an encoder name (None for a ``prefix:`` name or an unknown one)."""
    from napari_pathology.features import list_encoders

    return next((e for e in list_encoders() if e.name == name), None)


def _check_existing(
    entries: Sequence[Any], features_dir: Path, encoder: str
) -> tuple[list[Any], dict[str, Any], str | None]:
    """Refuse existing files of another encoder (or of other weights than the rest).

    Returns the slides without a file, one file's attributes and the weights
    digest the existing files share (None when they do not say).
    """
    seen: dict[Path, Path] = {}
    missing, first, digest, digest_file = [], {}, None, None
    for entry in entries:
        path = bag_path(features_dir, entry.path)
        if path in seen and seen[path] != Path(entry.path):
            raise TrainingError(
                f"{seen[path]} and {entry.path} would share the feature file {path}; "
                "rename one of the slides (feature files are named by the slide's stem)"
            )
        seen[path] = Path(entry.path)
        if not path.exists():
            missing.append(entry)
            continue
        found, attrs = h5_encoder(path)
        if found is not None and found != encoder:
            raise TrainingError(
                f"{path}: features from another encoder ({found}; these settings' encoder is {encoder}): "
                f"set the encoder to {found}, or give another features folder to extract them with {encoder}"
            )
        recorded = attrs.get("provenance")
        mine = recorded.get("digest") if isinstance(recorded, dict) else None
        if mine is not None and digest is not None and mine != digest:
            raise TrainingError(
                f"{digest_file.name} and {path.name} hold features of {encoder} with different weights "
                f"(digests {digest}, {mine}); extract every slide with the same weights"
            )
        if mine is not None and digest is None:
            digest, digest_file = mine, path
        if not first and found is not None:
            first = attrs
    return missing, first, digest


def _relay(job: Generator[Progress, None, Any], prefix: str) -> Generator[TrainEvent, None, Any]:
    """A slide's extraction progress as ``log`` lines, one every couple of seconds and the last one."""
    last = 0.0
    while True:
        try:
            progress = next(job)
        except StopIteration as done:
            return done.value
        now = time.monotonic()
        final = progress.total > 0 and progress.done >= progress.total
        if progress.message and (final or now - last >= _RELAY_SECONDS):
            last = now
            yield TrainEvent("log", 0, 0, message=f"{prefix}: {progress.message}")


def _build_encoder(name: str, weights: str | None, device: str) -> Any:
    from napari_pathology.features import EncoderError, get_encoder

    logging.disable(logging.WARNING)  # an untrained encoder is refused below, in the trainer's words
    try:
        encoder = get_encoder(name, weights=weights, device=device)
    except EncoderError as error:
        raise TrainingError(str(error)) from None
    finally:
        logging.disable(logging.NOTSET)
    if not encoder.trained:
        raise TrainingError(
            f"encoder {name} has no trained weights on this machine (random weights give features Run "
            "could not reproduce): give encoder_weights (a weights file or model name), or another encoder "
            "such as tumor-normal-trunk"
        )
    return encoder


def prepare_bags(
    entries: Sequence[Any],
    features_dir: str | os.PathLike[str],
    encoder: str,
    weights: str | None = None,
    *,
    device: str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    stop: threading.Event | None = None,
) -> Generator[TrainEvent, None, FeatureSource]:
    """Make sure every slide of a table has its feature file, extracting the missing ones.

    Existing files are reused; one recorded as another encoder's (or of other
    weights than the rest) is refused before any extraction. The missing ones
    are extracted in table order with ``log`` events (``features 3/24:
    slide.tif``), tissue and patches found as Run finds them, the batches
    cached in ``cache_dir`` (default ``<features_dir>/.cache``), so that a
    stopped job continues where it was when run again.

    Returns
    -------
    FeatureSource
        The encoder, its weights and patch geometry; ``stopped`` says why
        extraction ended early (``stop`` set), else "".

    Raises
    ------
    TrainingError
        One line: a file of another encoder, an encoder without trained
        weights, a slide that cannot be opened or has no tissue (named).
    """
    from napari_pathology.analysis.settings import NoTissueError, RunSettings
    from napari_pathology.slide import open_slide

    features_dir = Path(features_dir)
    missing, attrs, digest = _check_existing(entries, features_dir, encoder)
    provenance = dict(attrs.get("provenance") or {}) if isinstance(attrs.get("provenance"), dict) else {}
    source = FeatureSource(encoder, weights or provenance.get("weights"), provenance=provenance)
    if attrs.get("patch_size_px") is not None and attrs.get("mpp") is not None:
        source.patch_size, source.mpp = int(attrs["patch_size_px"]), float(attrs["mpp"])
    entry = _registered(encoder)
    built = None
    if missing or entry is None or (source.patch_size is None and entry.patch_size is None):
        built = _build_encoder(encoder, weights, device)
        if digest is not None and digest != built.digest():
            raise TrainingError(
                f"the feature files in {features_dir} were extracted with other weights of {encoder} "
                f"(digest {digest}, these settings give {built.digest()}); set encoder_weights to theirs, "
                "or give another features folder"
            )
        source.weights = weights or built.provenance.get("weights")
        source.provenance = {**built.provenance, "digest": built.digest()}
        source.normalization = built.normalization
        if source.patch_size is None:
            source.patch_size, source.mpp = int(built.patch_size), float(built.mpp)
    else:
        source.normalization = entry.normalization
        if source.patch_size is None:
            source.patch_size, source.mpp = int(entry.patch_size), float(entry.mpp)
    if not missing:
        return source
    cache = Path(cache_dir) if cache_dir is not None else features_dir / ".cache"
    least = RunSettings().min_tissue_fraction  # the patches Run keeps
    features_dir.mkdir(parents=True, exist_ok=True)
    yield TrainEvent("log", 0, 0, message=(
        f"{len(missing)} of {len(entries)} slides have no features in {features_dir}: extracting them with "
        f"{encoder} ({source.patch_size} px at {source.mpp:g} um/px; batches cached in {cache})"
    ))  # fmt: skip
    for k, slide_entry in enumerate(missing):
        where = f"features {k + 1}/{len(missing)}: {Path(slide_entry.path).name}"
        if stop is not None and stop.is_set():
            source.stopped = f"stopped before {where}"
            return source
        yield TrainEvent("log", 0, 0, message=f"{where} ...")
        try:
            slide = open_slide(slide_entry.path, mpp=slide_entry.mpp)
            slide.validate()
            slide.require_mpp()
        except Exception as error:  # the reader's own words, on one line, naming the slide
            text = str(error).splitlines()[0] if str(error) else type(error).__name__
            target = bag_path(features_dir, slide_entry.path)
            raise TrainingError(
                f"{slide_entry.path}: cannot extract its features (no {target.name} yet): {text}"
            ) from None
        target = bag_path(features_dir, slide_entry.path)
        try:
            with slide:
                feats = yield from _relay(
                    extract_to_h5(
                        slide, built, target, cache_dir=cache, min_tissue_fraction=least, stop=stop
                    ),
                    where,
                )
        except NoTissueError as error:
            raise TrainingError(f"{slide_entry.path}: {error}") from None
        except InterruptedError as error:
            source.stopped = f"{where}: {error}"
            return source
        source.extracted.append(Path(slide_entry.path).name)
        yield TrainEvent("log", 0, 0, message=f"{where}: {len(feats)} patches -> {target.name}")
    return source
