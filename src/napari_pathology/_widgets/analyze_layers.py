"""napari layers of an analysis result: what the Analyze panel shows, whatever runner made it.

:class:`ResultLayers` draws one run on one slide: the growing heatmap while
the run goes on, then every part of the :class:`~napari_pathology.analysis.AnalysisResult`:
its heatmap (named and coloured by its kind: ``heatmap``, ``attention``,
``purity``, ``activation map``), its detections as points with their scores,
its nuclei as in-view points coloured by tumour probability. Every layer is
tied to the slide (:func:`napari_pathology._layers.link_metadata`) so it
follows the slide's um/px.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from napari_pathology._layers import (
    PLACED_SCALE_KEY,
    follow_slide_scale,
    link_metadata,
    overlay_geometry,
    placed_scale,
)
from napari_pathology._widgets.nuclei_layers import (
    DEFAULT_DIAMETER_UM,
    point_sizes,
    probability_rgba,
    view_box_um,
)
from napari_pathology.analysis.result import HEATMAP_KINDS
from napari_pathology.world import world_from_um

if TYPE_CHECKING:
    import napari

    from napari_pathology.analysis import AnalysisResult, HeatmapBlock

#: Colormap of each heatmap kind (a napari colormap name, or "transparent-low" for
#: :func:`transparent_low_colormap`); kinds not listed get :data:`DEFAULT_COLORMAP`.
HEATMAP_COLORMAPS = {
    "probability": "transparent-low",
    "attention": "coolwarm",  # diverging, as CLAM's heatmaps
    "purity": "coolwarm",
    "activation": "magma",
}
DEFAULT_COLORMAP = "viridis"
HEATMAP_OPACITY = 0.5
#: Opacity of a computed cell at probability 0: a faint veil shows the grid a run has covered.
COVERED_ALPHA = 0.12
#: Detections are drawn as rings: border width relative to the ring's size, and opacity.
RING_WIDTH = 0.12
RING_OPACITY = 0.8


def transparent_low_colormap(name: str = "inferno") -> Any:
    """``name`` (inferno) fading in from a faint veil: low values leave the tissue visible.

    Plain inferno paints probability 0 black, which at 0.5 opacity darkens
    all the tissue; here alpha rises from :data:`COVERED_ALPHA` at probability 0
    (the covered grid stays visible; cells not computed are NaN, drawn clear)
    to 1 at 0.4.
    """
    from napari.utils.colormaps import Colormap, ensure_colormap

    colors = np.array(ensure_colormap(name).colors, dtype=np.float32)
    colors[:, 3] = np.clip(np.linspace(0.0, 2.5, len(colors)), COVERED_ALPHA, 1.0)
    return Colormap(colors, name=f"{name} (transparent low)", display_name=f"{name}, transparent low")


def heatmap_colormap(kind: str = "probability") -> Any:
    """The colormap a heatmap of ``kind`` is shown with."""
    name = HEATMAP_COLORMAPS.get(kind, DEFAULT_COLORMAP)
    return transparent_low_colormap() if name == "transparent-low" else name


def heatmap_limits(kind: str, data: np.ndarray) -> tuple[float, float]:
    """Contrast limits: 0-1 for kinds bounded to it, else the range of the finite values."""
    if HEATMAP_KINDS[kind].bounded:
        return (0.0, 1.0)
    finite = np.asarray(data, dtype=np.float64)[np.isfinite(data)]
    if not finite.size:
        return (0.0, 1.0)
    low, high = float(finite.min()), float(finite.max())
    return (low, high) if high > low else (low, low + 1.0)


#: What a model spec says of shipped weights trained on synthetic slides.
DEMO_MARK = "synthetic demo"


def is_demo(spec: Any) -> bool:
    """Whether a model (a spec or its dict) is a synthetic demo.

    Its name ends in ``-demo`` or its description says "synthetic demo".
    """
    get = spec.get if isinstance(spec, dict) else lambda key, default="": getattr(spec, key, default)
    name, description = str(get("name", "") or ""), str(get("description", "") or "")
    return name.endswith("-demo") or DEMO_MARK in description.lower()


def score_meaning(result: AnalysisResult) -> tuple[str, str]:
    """What a result's slide score is and what its per-class scores are, in words."""
    spec = result.spec
    aggregator = str(spec.get("aggregator", ""))
    positive = str(spec.get("positive_class") or "positive")
    if result.heatmap_kind == "attention":
        return "probability of the predicted class for the whole slide", "class probabilities (sum to 1)"
    if result.heatmap_kind == "activation":  # one network over the whole slide: one prediction
        return "one prediction of the network for the whole slide", "class probabilities (sum to 1)"
    meanings = {
        "max": (f"highest {positive} probability of any tile", "per class, its highest tile probability"),
        "mean": ("mean over the cells", "per class, its mean over the cells"),
        "fraction": (
            f"share of tissue tiles whose most likely class is {positive}",
            "per class, the share of tissue tiles it wins",
        ),
    }
    return meanings.get(aggregator, (f"aggregated by {aggregator or 'the model'}", "class scores"))


def result_text(result: AnalysisResult) -> tuple[str, str]:
    """The panel's two lines for a result (rich text): its slide score and what it is; its state and folder.

    A partial result says so beside the score; a synthetic demo model's result says it is one.
    """
    title = result.score_title[:1].upper() + result.score_title[1:]
    score = f"{result.slide_score:.3f}" if np.isfinite(result.slide_score) else "-"
    score_meant, classes_meant = score_meaning(result)
    partial = (
        f" <span style='color:#ff9030'>PARTIAL ({result.tiles_done}/{result.tiles_total} {result.unit}, "
        "cancelled: not the whole slide)</span>"
        if result.partial
        else ""
    )
    demo = (
        f"<br><span style='color:#ffb000'>{DEMO_MARK} model: trained on synthetic slides, "
        "not for diagnostic use</span>"
        if is_demo(result.spec)
        else ""
    )
    state = "partial (cancelled)" if result.partial else "complete"
    parts = [f"{result.tiles_done}/{result.tiles_total} {result.unit}"]
    if len(result.detections) or result.points is None:
        parts.append(f"{len(result.detections)} detections")
    if result.points is not None and result.unit != "nuclei":  # else the count before says it
        parts.append(f"{result.n_points} nuclei")
    scores = ", ".join(f"{k} {v:.3f}" for k, v in result.scores.items())
    return (
        f"{title}: {score}{partial}<br><small style='font-weight: normal'>{score_meant}</small>{demo}",
        f"{state}: {', '.join(parts)}; {classes_meant}: {scores}. Saved in {result.out_dir}",
    )


class ResultLayers:
    """The layers of one run of one model on one slide.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    slide_layer : napari.layers.Image
        The slide the run reads.
    model_name : str
        Goes into the layer names: ``"<slide> <model> <title>"``.
    run_scale : (float, float)
        The slide layer's ``scale`` ``(y, x)`` (its um/px) the run computes with.
    """

    def __init__(
        self, viewer: napari.Viewer, slide_layer: Any, model_name: str, run_scale: tuple[float, float]
    ) -> None:
        self.viewer = viewer
        self.slide_layer = slide_layer
        self.model_name = model_name
        self.run_scale = run_scale
        self.heatmap_layer: Any = None
        self.heatmap_kind = "probability"
        self.detections_layer: Any = None
        self.points: InViewPoints | None = None
        #: The shown result's raw heatmap (an attention result can be shown as percentiles of it).
        self.raw_heatmap: np.ndarray | None = None
        self.percentile = True

    @property
    def run_mpp(self) -> tuple[float, float]:
        """The slide's ``(mpp_x, mpp_y)`` the run computes with."""
        sy, sx = self.run_scale
        return (sx, sy)

    def name(self, title: str) -> str:
        """A layer name: ``"<slide> <model> <title>"``."""
        return f"{self.slide_layer.name} {self.model_name} {title}"

    def link(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Metadata tying a layer to the run's slide, placed at the run's um/px."""
        return {**(extra or {}), **link_metadata(self.slide_layer.metadata, self.run_scale)}

    def _add_image(self, title: str, data: np.ndarray, kind: str, geometry: dict[str, Any]) -> Any:
        self._remove(self.name(title))
        return self.viewer.add_image(
            data, name=self.name(title), colormap=heatmap_colormap(kind),
            contrast_limits=heatmap_limits(kind, data), opacity=HEATMAP_OPACITY, blending="translucent",
            units=self.slide_layer.units, metadata=self.link(), **geometry,
        )  # fmt: skip

    def _remove(self, name: str, keep: Any = None) -> None:
        if name in self.viewer.layers and self.viewer.layers[name] is not keep:
            self.viewer.layers.remove(name)

    def show_grid(self, grid: Any, kind: str = "probability") -> Any:
        """An empty heatmap laid out on a run's tile grid, to fill in as blocks arrive."""
        geometry = overlay_geometry(grid.cell_um, grid.first_centre_um, self.run_mpp)
        data = np.full(grid.shape, np.nan, np.float32)
        title = HEATMAP_KINDS[kind].title
        old = self.viewer.layers[self.name(title)] if self.name(title) in self.viewer.layers else None
        if (
            old is not None
            and old.data.shape == data.shape
            and np.allclose(old.scale, geometry["scale"])
            and np.allclose(old.translate, geometry["translate"])
        ):
            old.data = data  # a re-run on the same grid: reuse the layer (no removal, no gc pass)
            old.metadata = self.link()
            self.heatmap_layer = old
        else:
            self.heatmap_layer = self._add_image(title, data, kind, geometry)
        self.heatmap_kind = kind
        self.raw_heatmap = None  # streaming raw values: percentiles only once the result is complete
        follow_slide_scale([self.heatmap_layer], self.slide_layer)
        return self.heatmap_layer

    def paint(self, block: HeatmapBlock) -> None:
        """Write finished cells into the growing heatmap (shown by :meth:`refresh`)."""
        if self.heatmap_layer is not None:
            rows, cols = block.cells[:, 0], block.cells[:, 1]
            self.heatmap_layer.data[rows, cols] = block.values
            if block.kind != self.heatmap_kind:
                self._restyle(self.heatmap_layer, block.kind)

    def refresh(self) -> None:
        """Redraw the growing heatmap (its contrast follows the data for kinds not bounded to 0-1)."""
        layer = self.heatmap_layer
        if layer is not None:
            if not HEATMAP_KINDS[self.heatmap_kind].bounded:
                layer.contrast_limits = heatmap_limits(self.heatmap_kind, layer.data)
            layer.refresh()

    def _restyle(self, layer: Any, kind: str) -> None:
        """Name and colour a heatmap layer for ``kind`` (its data already there)."""
        title = HEATMAP_KINDS[kind].title
        if layer.name != self.name(title):
            self._remove(self.name(title), keep=layer)
            layer.name = self.name(title)
        layer.colormap = heatmap_colormap(kind)
        layer.contrast_limits = heatmap_limits(kind, layer.data)
        self.heatmap_kind = kind

    def show(self, result: AnalysisResult) -> None:
        """Show everything ``result`` holds: its heatmap, detections and points (layers reused)."""
        self._show_heatmap(result)
        self._show_detections(result)
        self._show_points(result)

    def set_percentile(self, percentile: bool) -> None:
        """Show an attention heatmap as percentiles of its raw scores (CLAM's view) or raw.

        The layer's data is replaced in place; other kinds are always shown as they are.
        """
        from napari_pathology._widgets.analyze_view import attention_percentiles

        self.percentile = percentile
        layer = self.heatmap_layer
        if layer is None or self.raw_heatmap is None or self.heatmap_kind != "attention":
            return
        if percentile:
            layer.data = attention_percentiles(self.raw_heatmap)
            layer.contrast_limits = (0.0, 100.0)
        else:
            layer.data = self.raw_heatmap
            layer.contrast_limits = heatmap_limits("attention", self.raw_heatmap)

    @property
    def showing_percentiles(self) -> bool:
        """Whether the heatmap layer shows attention percentiles."""
        return self.heatmap_kind == "attention" and self.percentile and self.raw_heatmap is not None

    def _show_heatmap(self, result: AnalysisResult) -> None:
        kind = result.heatmap_kind
        layer = self.heatmap_layer
        if layer is not None and layer in self.viewer.layers and layer.data.shape == result.heatmap.shape:
            layer.data = result.heatmap  # in place: removing a layer costs napari a full gc pass (~0.4 s)
            self._restyle(layer, kind)
        else:
            geometry = overlay_geometry(result.cell_um, result.first_centre_um, self.run_mpp)
            layer = self._add_image(result.kind.title, result.heatmap, kind, geometry)
        self.heatmap_layer, self.heatmap_kind = layer, kind
        self.raw_heatmap = result.heatmap
        if kind == "attention":
            self.set_percentile(self.percentile)
        placed = layer.metadata.get(PLACED_SCALE_KEY)  # kept: the layer may have moved since
        metadata = self.link({
            "napari_pathology_result": str(result.out_dir), "spec": result.spec, "heatmap_kind": kind,
        })  # fmt: skip
        layer.metadata = {**metadata, PLACED_SCALE_KEY: placed or metadata[PLACED_SCALE_KEY]}
        follow_slide_scale([layer], self.slide_layer)

    def _show_detections(self, result: AnalysisResult) -> None:
        """Detections as semi-transparent rings the size of a patch, coloured by score (layer reused)."""
        name = self.name("detections")
        old = self.viewer.layers[name] if name in self.viewer.layers else None
        detections = np.asarray(result.detections, dtype=np.float64)
        if not len(detections):  # none: no empty layer left behind
            self._remove(name)
            self.detections_layer = None
            return
        size = ring_size_um(result)
        scores = detections[:, 2]
        limits = (0.5, 1.0) if result.heatmap_kind != "attention" else _score_limits(scores)
        data = world_from_um(detections[:, :2], self.run_mpp)
        if old is not None:  # a rerun: new data in the same layer (removing a layer costs a gc pass)
            old.metadata = self.link()
            old.data = data
            old.features = {"score": scores}
            old.size = size
            layer = old
        else:
            layer = self.viewer.add_points(
                data, name=name, features={"score": scores}, size=size, face_color="transparent",
                border_color="score", border_colormap="viridis", border_width=RING_WIDTH,
                border_width_is_relative=True, opacity=RING_OPACITY, units=self.slide_layer.units,
                metadata=self.link(),
            )  # fmt: skip
        layer.border_color = "score"
        layer.border_contrast_limits = limits
        follow_slide_scale([layer], self.slide_layer)
        self.detections_layer = layer

    def _show_points(self, result: AnalysisResult) -> None:
        name = self.name("nuclei")
        if self.points is not None and self.points.layer in self.viewer.layers and result.points is not None:
            self.points.replace(result.points, self.run_mpp)  # a rerun: the same layer, new nuclei
            return
        if self.points is not None:
            self.points.remove()
        self._remove(name)
        self.points = None
        if result.points is not None:
            self.points = InViewPoints(self.viewer, result.points, name, self.run_mpp, self)


def ring_size_um(result: AnalysisResult) -> float:
    """Diameter of a detection's ring (um): the model's patch (``input_size`` px at ``mpp``), else a cell."""
    size, mpp = result.spec.get("input_size"), result.spec.get("mpp")
    if result.heatmap_kind != "attention" and result.spec.get("centre_size"):
        size = result.spec["centre_size"]  # a tile model's label covers its centre
    return float(size) * float(mpp) if size and mpp else float(result.cell_um)


def _score_limits(scores: np.ndarray) -> tuple[float, float]:
    finite = scores[np.isfinite(scores)]
    if not finite.size or finite.max() <= finite.min():
        return (0.0, 1.0)
    return (float(finite.min()), float(finite.max()))


def _camera(viewer: napari.Viewer) -> Any:
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


class InViewPoints:
    """Points of a result (10^5-10^6 nuclei) that keep panning fluid: only those in view are drawn.

    The points inside the view are drawn, coloured by tumour probability, when
    there are at most ``max_points`` of them, refreshed shortly after the
    camera stops moving. The layer is tied to the slide: when the slide's
    um/px changes, the points (micrometres at the run's um/px) follow.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    points : NucleusPoints
        The nuclei, in micrometres at ``run_mpp``.
    name : str
        The layer's name.
    run_mpp : (float, float)
        The slide's ``(mpp_x, mpp_y)`` the points were computed at.
    owner : ResultLayers
        Gives the slide layer and the link metadata.
    max_points : int
        Most points drawn at once.
    """

    def __init__(
        self, viewer: napari.Viewer, points: Any, name: str, run_mpp: tuple[float, float],
        owner: ResultLayers, max_points: int = 8000,
    ) -> None:  # fmt: skip
        from qtpy.QtCore import QTimer

        from napari_pathology.nuclei.density import PointIndex

        self.viewer = viewer
        self.points = points
        self.run_mpp = run_mpp
        self.max_points = max_points
        self.index = PointIndex(points.xy_um())
        self.layer = viewer.add_points(
            np.zeros((0, 2)), name=name, size=DEFAULT_DIAMETER_UM, border_width=0,
            units=owner.slide_layer.units, metadata=owner.link({"kind": "points"}),
            features={"probability": np.zeros(0)},
        )  # fmt: skip
        follow_slide_scale([self.layer], owner.slide_layer)
        self.shown = np.zeros(0, np.int64)
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(80)
        self._timer.timeout.connect(self.update)
        camera = _camera(viewer)
        camera.events.center.connect(self._schedule)
        camera.events.zoom.connect(self._schedule)
        self._connected = True
        self.update()

    def _schedule(self, event: Any = None) -> None:
        self._timer.start()

    def _factors(self) -> tuple[float, float]:
        """How far the slide's um/px moved since the run: ``(now / run)`` in x and y."""
        sy, sx = placed_scale(self.layer.metadata) or self.run_mpp[::-1]
        return sx / self.run_mpp[0], sy / self.run_mpp[1]

    def update(self) -> None:
        """Draw the points in view, or none when there are too many to stay fluid."""
        if self.layer not in self.viewer.layers:
            self.disconnect()
            return
        fx, fy = self._factors()
        mpp = (self.run_mpp[0] * fx, self.run_mpp[1] * fy)
        x, y, w, h = view_box_um(self.viewer, mpp, pad=1.2)
        box = (x / fx, y / fy, w / fx, h / fy)  # in micrometres at the run's um/px
        index = np.zeros(0, np.int64)
        if self.index.count_upper_bound(box) <= 4 * self.max_points:
            index = self.index.query(box)
            if len(index) > self.max_points:
                index = np.zeros(0, np.int64)
        if np.array_equal(index, self.shown):
            return
        self.shown = index
        subset = self.points.subset(index)
        self.layer.data = world_from_um(subset.xy_um() * np.array([fx, fy]), mpp)
        self.layer.features = {"probability": subset.probability.astype(np.float64)}
        if len(index):
            self.layer.size = point_sizes(subset.area_um2) * float(np.sqrt(fx * fy))
            self.layer.face_color = probability_rgba(subset.probability)

    def replace(self, points: Any, run_mpp: tuple[float, float]) -> None:
        """Show other nuclei (a rerun's) in the same layer."""
        from napari_pathology.nuclei.density import PointIndex

        self.points, self.run_mpp = points, run_mpp
        self.index = PointIndex(points.xy_um())
        self.shown = np.full(1, -1, np.int64)  # forces the redraw
        self.update()

    def remove(self) -> None:
        """Take the layer out of the viewer and stop following the camera."""
        self.disconnect()
        if self.layer in self.viewer.layers:
            self.viewer.layers.remove(self.layer)

    def disconnect(self) -> None:
        """Stop following the camera (once)."""
        self._timer.stop()
        if not self._connected:
            return
        self._connected = False
        camera = _camera(self.viewer)
        camera.events.center.disconnect(self._schedule)
        camera.events.zoom.disconnect(self._schedule)
