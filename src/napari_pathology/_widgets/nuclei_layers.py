"""napari layers for nuclei: the editable annotation layer and the whole-slide prediction overlay.

Coordinates: a slide layer draws level-0 pixel ``i`` centred at ``i * mpp``
(no translate), while nuclei are stored physically (pixel ``i`` covers
``[i, i + 1) * mpp``), so a nucleus at ``x_um`` is drawn at ``x_um - mpp / 2``.
Nucleus layers live in world micrometres (scale 1), like the detections of
the Analyze panel.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_pathology.nuclei.density import PointIndex, density_grid
from napari_pathology.nuclei.points import LABEL_COLOURS, LABELS, SOURCES, NucleusPoints
from napari_pathology.world import um_from_world, world_from_um

if TYPE_CHECKING:
    import napari

#: Key in the metadata of every nuclei annotation layer (value: the slide path).
NUCLEI_MARKER = "napari_pathology_nuclei"
#: Key in the metadata of prediction layers (value: the slide path).
PREDICTIONS_MARKER = "napari_pathology_nucleus_predictions"
#: Drawn diameter of a nucleus whose area is unknown (manual points), micrometres.
DEFAULT_DIAMETER_UM = 7.0
UNCLASSIFIED_RGBA = (0.6, 0.6, 0.6, 1.0)


def slide_mpp_xy(slide_layer: Any) -> tuple[float, float]:
    """A slide layer's level-0 ``(mpp_x, mpp_y)``; 1 when it has none (drawn in pixels)."""
    meta = slide_layer.metadata
    return (float(meta["mpp_x"]), float(meta["mpp_y"])) if meta.get("mpp_x") else (1.0, 1.0)


#: Fill opacity of nucleus markers: the nucleus stays visible under its label colour.
FILL_ALPHA = 0.45


def view_box_um(
    viewer: napari.Viewer, mpp: tuple[float, float], pad: float = 1.0
) -> tuple[float, float, float, float]:
    """The physical box ``(x, y, width, height)`` the canvas shows, in micrometres, scaled by ``pad``."""
    centre = np.asarray(viewer.camera.center, dtype=np.float64)[-2:]
    half = np.asarray(viewer.canvas.size, dtype=np.float64) / max(viewer.camera.zoom, 1e-9) / 2 * pad
    ((x0, y0),) = um_from_world(centre - half, mpp)  # canvas size is (height, width)
    return (float(x0), float(y0), float(2 * half[1]), float(2 * half[0]))


def label_rgba(codes: np.ndarray) -> np.ndarray:
    """``(N, 4)`` RGBA in [0, 1] for label codes (indices into ``LABELS``), half transparent."""
    table = np.array([(*LABEL_COLOURS[name], 255) for name in LABELS], np.float32) / 255.0
    table[:, 3] = FILL_ALPHA
    return table[np.asarray(codes, dtype=np.int64)]


def probability_rgba(probability: np.ndarray) -> np.ndarray:
    """``(N, 4)`` RGBA blending the normal colour (0) into the tumour colour (1); grey when NaN."""
    p = np.asarray(probability, dtype=np.float32).reshape(-1, 1)
    normal = np.array(LABEL_COLOURS["normal"], np.float32) / 255.0
    tumour = np.array(LABEL_COLOURS["tumour"], np.float32) / 255.0
    rgb = normal + np.nan_to_num(p) * (tumour - normal)
    rgba = np.column_stack([rgb, np.full(len(p), FILL_ALPHA, np.float32)])
    rgba[~np.isfinite(p[:, 0])] = (*UNCLASSIFIED_RGBA[:3], FILL_ALPHA)
    return rgba


def point_sizes(area_um2: np.ndarray) -> np.ndarray:
    """Drawn diameters in micrometres: the equivalent circle of each area, clipped to 4-10 um.

    Clumps the detector could not split have large areas; the clip keeps their
    markers nucleus-sized so they do not hide their neighbours.
    """
    area = np.asarray(area_um2, dtype=np.float64)
    diameter = np.where(np.isfinite(area), 2 * np.sqrt(np.maximum(area, 0) / np.pi), DEFAULT_DIAMETER_UM)
    return np.clip(diameter, 4.0, 10.0)


def points_features(points: NucleusPoints) -> Any:
    """The layer's features table: label and source as text, probability and area as numbers."""
    import pandas as pd

    return pd.DataFrame(
        {
            "label": np.asarray(LABELS, dtype=object)[points.label],
            "probability": points.probability.astype(np.float64),
            "area_um2": points.area_um2.astype(np.float64),
            "source": np.asarray(SOURCES, dtype=object)[points.source],
        }
    )


def _codes(values: Any, names: tuple[str, ...], default: int) -> np.ndarray:
    lookup = {name: code for code, name in enumerate(names)}
    return np.array([lookup.get(str(v), default) for v in values], dtype=np.int8)


def points_from_layer(layer: Any, mpp: tuple[float, float]) -> NucleusPoints:
    """The nuclei of an annotation layer as a :class:`NucleusPoints` table."""
    xy = um_from_world(np.asarray(layer.data)[:, -2:], mpp) if len(layer.data) else np.zeros((0, 2))
    features = layer.features
    n = len(xy)

    def column(name: str, default: float) -> np.ndarray:
        if name in features and len(features) == n:
            return np.asarray(features[name], dtype=np.float64)
        return np.full(n, default)

    labels = features["label"] if "label" in features and len(features) == n else ["unlabeled"] * n
    sources = features["source"] if "source" in features and len(features) == n else ["manual"] * n
    return NucleusPoints(
        x_um=xy[:, 0],
        y_um=xy[:, 1],
        label=_codes(labels, LABELS, 0),
        probability=column("probability", np.nan).astype(np.float32),
        area_um2=column("area_um2", np.nan).astype(np.float32),
        source=_codes(sources, SOURCES, SOURCES.index("manual")),
    )


def layer_colours(points: NucleusPoints, colour_by: str) -> np.ndarray:
    """Face colours by ``"label"`` or ``"probability"``."""
    if colour_by == "probability":
        return probability_rgba(points.probability)
    return label_rgba(points.label)


def add_nuclei_layer(
    viewer: napari.Viewer, slide_layer: Any, points: NucleusPoints, name: str, colour_by: str = "label"
) -> Any:
    """Add an editable nuclei layer over ``slide_layer``; new points are unlabeled and manual."""
    mpp = slide_mpp_xy(slide_layer)
    layer = viewer.add_points(
        world_from_um(points.xy_um(), mpp),
        name=name,
        features=points_features(points),
        size=point_sizes(points.area_um2),
        face_color=layer_colours(points, colour_by) if len(points) else "gray",
        border_color="white",
        border_width=0.08,
        border_width_is_relative=True,
        units=slide_layer.units,
        metadata={NUCLEI_MARKER: slide_layer.metadata.get("path"), "colour_by": colour_by},
    )
    reset_defaults(layer)
    return layer


def reset_defaults(layer: Any) -> None:
    """What a point added by hand gets: unlabeled, manual, default size and grey."""
    layer.feature_defaults = {
        "label": "unlabeled",
        "probability": np.nan,
        "area_um2": np.nan,
        "source": "manual",
    }
    layer.current_size = DEFAULT_DIAMETER_UM


def replace_points(layer: Any, points: NucleusPoints, mpp: tuple[float, float]) -> None:
    """Swap all of a nuclei layer's points (keeps the layer, so no costly removal)."""
    colour_by = layer.metadata.get("colour_by", "label")
    layer.selected_data = set()
    layer.data = world_from_um(points.xy_um(), mpp)
    layer.features = points_features(points)
    layer.size = point_sizes(points.area_um2)
    if len(points):
        layer.face_color = layer_colours(points, colour_by)
    reset_defaults(layer)


def repaint(layer: Any, mpp: tuple[float, float]) -> None:
    """Recolour every point from its features (after labels or probabilities changed)."""
    if len(layer.data):
        layer.face_color = layer_colours(
            points_from_layer(layer, mpp), layer.metadata.get("colour_by", "label")
        )


def set_labels(layer: Any, indices: Any, label: str) -> int:
    """Label points ``indices`` of a nuclei layer; returns how many changed."""
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; use one of {', '.join(LABELS)}")
    index = np.array(sorted(int(i) for i in indices), dtype=np.int64)
    if not len(index):
        return 0
    column = layer.features["label"].to_numpy(dtype=object).copy()
    changed = int(np.count_nonzero(column[index] != label))
    column[index] = label
    layer.features["label"] = column
    if layer.metadata.get("colour_by", "label") == "label":
        colours = np.asarray(layer.face_color).copy()
        colours[index] = label_rgba(np.full(len(index), LABELS.index(label)))
        layer.face_color = colours
    layer.refresh()
    return changed


class PredictionOverlay:
    """Whole-slide nucleus predictions that keep panning fluid.

    A density image (nuclei per mm^2, or mean tumour probability once classified)
    covers the slide; the points inside the view are drawn only when there are at
    most ``max_points`` of them, refreshed shortly after the camera stops moving.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    slide_layer : napari.layers.Image
        The slide the predictions belong to.
    points : NucleusPoints
        The predicted nuclei.
    name : str
        Base name of the two layers.
    max_points : int
        Most points drawn at once.
    cell_um : float
        Side of a density cell.
    """

    def __init__(
        self,
        viewer: napari.Viewer,
        slide_layer: Any,
        points: NucleusPoints,
        name: str,
        max_points: int = 8000,
        cell_um: float = 64.0,
    ) -> None:
        from qtpy.QtCore import QTimer

        from napari_pathology._layers import link_metadata, overlay_geometry

        self.viewer = viewer
        self.slide_layer = slide_layer
        self.mpp = slide_mpp_xy(slide_layer)
        self.points = points
        self.max_points = max_points
        self.index = PointIndex(points.xy_um())
        meta = slide_layer.metadata
        extent = (float(meta["width"]) * self.mpp[0], float(meta["height"]) * self.mpp[1])
        self.grid = density_grid(points.xy_um(), extent, cell_um, points.probability)
        classified = bool(np.isfinite(points.probability).any())
        image = self.grid.mean_probability if classified else self.grid.density_per_mm2
        image = image if classified else np.where(self.grid.counts > 0, image, np.nan).astype(np.float32)
        limits = (
            (0.0, 1.0) if classified else (0.0, float(np.nanmax(image)) if np.isfinite(image).any() else 1.0)
        )
        marker = {PREDICTIONS_MARKER: meta.get("path"), **link_metadata(meta)}
        self.density_layer = viewer.add_image(
            image,
            name=f"{name} {'tumour probability' if classified else 'density'}",
            colormap="coolwarm" if classified else "viridis",
            contrast_limits=limits,
            opacity=0.55,
            blending="translucent",
            units=slide_layer.units,
            metadata=dict(marker, kind="density"),
            **overlay_geometry(cell_um, self.grid.first_centre_um, self.mpp),
        )
        self.points_layer = viewer.add_points(
            np.zeros((0, 2)),
            name=f"{name} points",
            size=DEFAULT_DIAMETER_UM,
            border_width=0,
            units=slide_layer.units,
            metadata=dict(marker, kind="points"),
            features={"probability": np.zeros(0)},
        )
        self.shown = np.zeros(0, np.int64)
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(80)
        self._timer.timeout.connect(self.update)
        viewer.camera.events.center.connect(self._schedule)
        viewer.camera.events.zoom.connect(self._schedule)
        self.density_layer.events.scale.connect(self._follow_slide_mpp)
        self.update()

    def _follow_slide_mpp(self, event: Any = None) -> None:
        """Keep the nuclei (micrometres at the old um/px) on the slide after its um/px changed.

        :func:`napari_pathology._layers.follow_slide_scale` moves both layers; the
        overlay redraws its points from micrometres, so those and their index scale too.
        """
        new = slide_mpp_xy(self.slide_layer)
        factor_x, factor_y = new[0] / self.mpp[0], new[1] / self.mpp[1]
        if np.isclose(factor_x, 1.0, rtol=1e-12, atol=0) and np.isclose(factor_y, 1.0, rtol=1e-12, atol=0):
            return
        self.points = dataclasses.replace(
            self.points,
            x_um=self.points.x_um * factor_x,
            y_um=self.points.y_um * factor_y,
            area_um2=self.points.area_um2 * (factor_x * factor_y),
        )
        self.index = PointIndex(self.points.xy_um())
        self.mpp = new
        self.shown = np.zeros(0, np.int64)
        self._schedule()

    def _schedule(self, event: Any = None) -> None:
        self._timer.start()

    def visible_box_um(self) -> tuple[float, float, float, float]:
        """The physical box ``(x, y, width, height)`` on screen, padded by a tenth on each side."""
        return view_box_um(self.viewer, self.mpp, pad=1.2)

    def update(self) -> None:
        """Show the points in view, or none when there are too many to stay fluid."""
        if self.points_layer not in self.viewer.layers:
            self.disconnect()
            return
        box = self.visible_box_um()
        if self.index.count_upper_bound(box) > 4 * self.max_points:
            index = np.zeros(0, np.int64)
        else:
            index = self.index.query(box)
            if len(index) > self.max_points:
                index = np.zeros(0, np.int64)
        if np.array_equal(index, self.shown):
            return
        self.shown = index
        subset = self.points.subset(index)
        layer = self.points_layer
        layer.data = world_from_um(subset.xy_um(), self.mpp)
        layer.features = {"probability": subset.probability.astype(np.float64)}
        if len(index):
            layer.size = point_sizes(subset.area_um2)
            layer.face_color = probability_rgba(subset.probability)

    def remove(self) -> None:
        """Take both layers out of the viewer and stop following the camera."""
        self.disconnect()
        for layer in (self.points_layer, self.density_layer):
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)

    def disconnect(self) -> None:
        """Stop following the camera (the layers were removed)."""
        self._timer.stop()
        self.density_layer.events.scale.disconnect(self._follow_slide_mpp)
        self.viewer.camera.events.center.disconnect(self._schedule)
        self.viewer.camera.events.zoom.disconnect(self._schedule)
