"""One ``run()`` for every model: the Analyze panel, the CLI's ``run`` and ``evaluate`` call it (no Qt).

A model's family (from its spec) says how it runs: by default the runner of
its input kind (:data:`RUNNERS`: ``tile`` is the sliding-window engine,
``nucleus`` detects every nucleus and classifies each, ``bag`` pools patch
features by attention: :mod:`napari_pathology.analysis.bag`); a family may
override :meth:`~napari_pathology.families.Family.run`. A model of no
registered family (built in code) runs by its spec: output ``nuclei`` with
the nucleus runner, aggregator ``attention`` with the bag runner, anything
else with the tile engine.

Every runner returns one type,
:class:`~napari_pathology.analysis.result.AnalysisResult` (its module says
how a runner fills it: a heatmap of a recorded kind, detections, points,
slide and per-class scores, provenance), saves it with
:func:`~napari_pathology.analysis.result.save_result` when given ``out_dir``
and calls ``on_saved`` with it once on disk. Callers never branch on a
family or a result class.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Generator
from typing import Any

__all__ = ["RUNNERS", "run", "runner_for"]


def _tile_runner(slide: Any, model: Any, **kwargs: Any) -> Generator[Any, None, Any]:
    from napari_pathology.analysis.engine import run_analysis

    return run_analysis(slide, model, **kwargs)


def _nucleus_runner(
    slide: Any, model: Any, *, tissue: Any = None, settings: Any = None, out_dir: Any = None,
    cancel: threading.Event | None = None, reuse: bool = True, on_saved: Any = None,
) -> Generator[Any, None, Any]:  # fmt: skip
    from napari_pathology.analysis.nuclei import run_nucleus_analysis

    return run_nucleus_analysis(
        slide, model, tissue, settings, out_dir, cancel, on_saved=on_saved, reuse=reuse
    )


def _bag_runner(slide: Any, model: Any, **kwargs: Any) -> Generator[Any, None, Any]:
    from napari_pathology.analysis.bag import run_bag_analysis

    return run_bag_analysis(slide, model, **kwargs)


def _slide_runner(slide: Any, model: Any, **kwargs: Any) -> Generator[Any, None, Any]:
    from napari_pathology.analysis.wholeslide import run_slide_analysis

    return run_slide_analysis(slide, model, **kwargs)


#: Inference runner by input kind: ``runner(slide, model, *, tissue, settings, out_dir, cancel,
#: reuse, on_saved)`` -> a generator of progress returning an AnalysisResult.
RUNNERS: dict[str, Callable[..., Generator[Any, None, Any]]] = {
    "tile": _tile_runner,
    "nucleus": _nucleus_runner,
    "bag": _bag_runner,
    "slide": _slide_runner,
}


def runner_for(input_kind: str) -> Callable[..., Generator[Any, None, Any]]:
    """The runner of an input kind; ValueError naming the kinds that have one."""
    try:
        return RUNNERS[input_kind]
    except KeyError:
        raise ValueError(
            f"no inference runner for input kind {input_kind!r} yet (runners: {', '.join(RUNNERS)})"
        ) from None


def run(
    slide: Any,
    model: Any,
    *,
    tissue: Any = None,
    settings: Any = None,
    out_dir: str | os.PathLike[str] | None = None,
    cancel: threading.Event | None = None,
    reuse: bool = True,
    on_saved: Callable[[Any], None] | None = None,
    features: str | os.PathLike[str] | None = None,
) -> Generator[Any, None, Any]:
    """Run ``model`` over ``slide`` the way its family runs: yields progress, returns an AnalysisResult.

    Parameters are those of :func:`napari_pathology.analysis.run_analysis`;
    a family that has no use for one (``reuse`` for nuclei) ignores it.
    ``features`` is a CLAM-layout h5 file of the slide's patch features, for
    attention-MIL (``bag``) models: used instead of extracting them.

    Raises
    ------
    ValueError
        When ``features`` is given for a model that does not take a bag.
    """
    from napari_pathology.families import family_of

    kwargs = {"tissue": tissue, "settings": settings, "out_dir": out_dir, "reuse": reuse,
              "on_saved": on_saved, "cancel": cancel}  # fmt: skip
    try:
        family = family_of(model.spec)
        kind = family.input_kind
    except KeyError:  # a model built in code (a notebook, a test) of no registered family: by its output
        family = None
        output, aggregator = getattr(model.spec, "output", None), getattr(model.spec, "aggregator", None)
        kind = "nucleus" if output == "nuclei" else "bag" if aggregator == "attention" else "tile"
    if features is not None:
        if kind != "bag":
            raise ValueError(
                f"a feature file applies to attention-MIL (bag) models; {model.spec.name} takes {kind} input"
            )
        kwargs["features_file"] = features
    if family is None:
        return runner_for(kind)(slide, model, **kwargs)
    return family.run(slide, model, **kwargs)
