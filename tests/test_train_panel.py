"""Train panel: fine-tune from drawn regions, Stop and Resume, refuse bad set-ups, stop on close."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

# Import the model registry before any viewer exists (see test_close_viewer.py: triton vs OpenGL).
import napari_pathology.models  # noqa: F401  isort: skip
from napari_pathology._widgets.train_panel import ANALYZE_DOCK, TrainPanel, shapes_to_polygons
from napari_pathology.cohort import SlideEntry, read_slide_table, write_slide_table
from napari_pathology.families.metastasis.patches import prepare_regions
from napari_pathology.geometry import geojson_to_polygons, polygons_to_geojson, rasterize_polygons
from napari_pathology.models import get_spec, load_checkpoint
from napari_pathology.progress import run_to_completion
from napari_pathology.training.loop import checkpoint_paths

PLUGIN = "napari-pathology"
WAIT_MS = 90_000


def tumour_polygon_px(truth) -> np.ndarray:
    """The planted tumour's outer ring, level-0 ``(x, y)`` px."""
    [polygon] = geojson_to_polygons(json.loads(truth.tumour_geojson.read_text()))
    return np.asarray(polygon[0], float)


def normal_box_px(truth, half: float = 160.0) -> np.ndarray:
    """A square of tissue far from the tumour: ``[[x0, y0], [x1, y1]]`` px."""
    from PIL import Image
    from scipy import ndimage

    tissue = np.asarray(Image.open(truth.tissue_png)) > 0
    cell = truth.width / tissue.shape[1]
    tumour = rasterize_polygons([[tumour_polygon_px(truth)]], tissue.shape, scale=cell)
    far = ndimage.distance_transform_edt(~tumour) * cell > 700
    depth = ndimage.distance_transform_edt(tissue) * cell
    r, c = np.unravel_index(np.argmax(np.where(far, depth, 0)), tissue.shape)
    assert depth[r, c] > 2 * half, "no tissue far enough from the tumour for a normal box"
    y, x = (r + 0.5) * cell, (c + 0.5) * cell
    return np.array([[x - half, y - half], [x + half, y + half]])


def add_regions(viewer, slide_layer, truth, labels=("tumour", "normal")):
    """A Shapes layer in micrometres: the truth tumour polygon and/or a normal rectangle."""
    mpp = slide_layer.metadata["mpp_x"]
    shapes = {
        "tumour": (tumour_polygon_px(truth)[:, ::-1] * mpp, "polygon"),
        "normal": (normal_box_px(truth)[:, ::-1] * mpp, "rectangle"),
    }
    return viewer.add_shapes(
        [shapes[label][0] for label in labels], shape_type=[shapes[label][1] for label in labels],
        features={"label": list(labels)}, name="regions", units=slide_layer.units,
    )  # fmt: skip


@pytest.fixture
def viewer_with_slide(make_napari_viewer, synthetic_slide):
    viewer = make_napari_viewer()
    [slide_layer] = viewer.open(str(synthetic_slide.slide_path), plugin=PLUGIN)
    return viewer, slide_layer


def configure(panel: TrainPanel, tmp_path, steps: int) -> None:
    """A tiny CPU fine-tune of the shipped metastasis model, no validation."""
    panel.select_family("metastasis")
    panel.select_start("metastasis")
    panel.set_source("viewer")
    panel.shapes_combo.setCurrentText("regions")
    panel.setting_widget("val_fraction").value = 0.0
    panel.setting_widget("steps").value = steps
    panel.setting_widget("batch_size").value = 2
    panel.device_combo.setCurrentIndex(panel.device_combo.findData("cpu"))
    panel.out_edit.setText(str(tmp_path))
    panel.name_edit.setText("tuned")


def test_fine_tune_from_drawn_regions_and_use_in_analyze(viewer_with_slide, qtbot, synthetic_slide, tmp_path):
    viewer, slide_layer = viewer_with_slide
    add_regions(viewer, slide_layer, synthetic_slide)
    _dock, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    assert isinstance(panel, TrainPanel)
    assert panel.slide_combo.current_layer() is slide_layer
    configure(panel, tmp_path, steps=4)
    panel.start_button.click()
    job = panel.current_job
    assert job is not None
    qtbot.waitUntil(lambda: job.done and "finished" in panel.status.text(), timeout=WAIT_MS)
    assert job.error is None and job.result.step == 4

    losses = [row for row in panel.history if "loss" in row]
    assert losses and losses[-1]["step"] == 4 and np.isfinite(losses[-1]["loss"])
    best, last, _state = checkpoint_paths(tmp_path / "tuned.pt")
    model = load_checkpoint(best)
    assert model.spec.family == "metastasis" and model.spec.name == "tuned"
    assert model.provenance["step"] == 4 and model.provenance["initialisation"] == "checkpoint metastasis"
    assert {(c["kind"], c["path"]) for c in panel.checkpoints} == {("best", str(best)), ("last", str(last))}
    assert panel.checkpoint_list.count() == 2 and "best" in panel.checkpoint_list.item(0).text()
    assert panel.progress.value() == panel.progress.maximum() == 4

    # what the panel wrote: tumour and normal GeoJSON in level-0 px, a one-row slide table
    [entry] = read_slide_table(tmp_path / "tuned.slides.csv")
    assert entry.path == synthetic_slide.slide_path and entry.is_tumour
    assert entry.normal_annotations is not None and entry.normal_annotations.is_file()
    [[ring]] = geojson_to_polygons(json.loads(entry.annotations.read_text()))
    assert np.abs(ring - tumour_polygon_px(synthetic_slide)).max() <= 1  # um -> px round trip

    assert panel.use_button.isEnabled()
    panel.use_button.click()  # docks the Analyze panel and selects the best checkpoint
    analyze = viewer.window.dock_widgets[ANALYZE_DOCK]
    assert analyze.model_source == str(best)
    assert "tuned" in analyze.model_combo.currentText()


def test_stop_saves_and_resume_continues(viewer_with_slide, qtbot, synthetic_slide, tmp_path):
    viewer, slide_layer = viewer_with_slide
    add_regions(viewer, slide_layer, synthetic_slide, labels=("tumour",))
    panel = TrainPanel(viewer)
    viewer.window.add_dock_widget(panel, name="Train")
    configure(panel, tmp_path, steps=20)

    def stop_at_first_step(job, event) -> None:
        if event.kind == "step" and not job.stop_event.is_set():
            panel.stop_button.click()

    panel.job_event.connect(stop_at_first_step)
    panel.start_button.click()
    first = panel.current_job
    # the state reaches the panel (a queued signal) after the job's "done" event: wait for the buttons
    qtbot.waitUntil(
        lambda: first.done and not panel.stop_button.isEnabled() and panel.resume_button.isEnabled(),
        timeout=WAIT_MS,
    )
    assert "stopped" in panel.status.text()
    panel.job_event.disconnect(stop_at_first_step)
    best, last, _state = checkpoint_paths(tmp_path / "tuned.pt")
    saved = load_checkpoint(last)
    assert saved.provenance["stopped"] is True
    stopped_at = saved.provenance["step"]
    assert 5 <= stopped_at < 20 and first.result.step == stopped_at

    panel.resume_button.click()
    resumed = panel.current_job
    assert resumed is not first
    qtbot.waitUntil(lambda: resumed.done and "finished" in panel.status.text(), timeout=WAIT_MS)
    assert resumed.result.step == 20 and not resumed.result.stopped
    assert load_checkpoint(last).provenance["step"] == 20
    assert load_checkpoint(best).provenance["step"] == 20
    steps = [row["step"] for row in panel.history if "loss" in row]
    assert steps[0] <= stopped_at < steps[-1] == 20  # one curve across the stop
    assert not panel.resume_button.isEnabled()  # nothing left to resume


def test_bad_set_ups_are_refused_without_a_job(
    viewer_with_slide, qtbot, synthetic_slide, tmp_path, monkeypatch
):
    messages: list[str] = []
    monkeypatch.setattr("napari.utils.notifications.show_error", messages.append)
    viewer, slide_layer = viewer_with_slide
    panel = TrainPanel(viewer)
    qtbot.addWidget(panel)
    configure(panel, tmp_path, steps=4)

    def refused(expected: str) -> None:
        before = len(messages)
        panel.start_button.click()
        assert panel.jobs == []
        assert len(messages) == before + 1 and expected in messages[-1], messages[before:]
        assert expected in panel.status.text()

    refused("no annotations")  # no Shapes layer
    normal_only = add_regions(viewer, slide_layer, synthetic_slide, labels=("normal",))
    panel.shapes_combo.setCurrentText(normal_only.name)
    refused("normal regions only")
    viewer.layers.remove(normal_only)
    add_regions(viewer, slide_layer, synthetic_slide, labels=("tumour", "normal"))
    panel.shapes_combo.setCurrentText("regions")
    panel.setting_widget("val_fraction").value = 0.2
    refused("too few slides for a validation split")  # one slide cannot be split
    panel.setting_widget("val_fraction").value = 0.0
    panel.setting_widget("lr").value = "fast"
    refused("not a number")
    panel.setting_widget("lr").value = ""
    slide_layer.metadata = {**slide_layer.metadata, "mpp_missing": True, "mpp_x": None, "mpp_y": None}
    refused("no um/px")
    # tumour/normal classifiers learn from slide labels: drawn regions are not offered
    panel.select_family("tumor-normal")
    assert panel.source == "table" and panel.setting_widget("epochs").value == 20  # from its dataclass
    refused("choose a slide table")


def test_a_trained_model_of_the_same_name_is_kept_and_jobs_use_one_thread(
    viewer_with_slide, qtbot, synthetic_slide, tmp_path
):
    from napari_pathology.models import create_model, save_checkpoint

    viewer, slide_layer = viewer_with_slide
    add_regions(viewer, slide_layer, synthetic_slide)
    panel = TrainPanel(viewer)
    qtbot.addWidget(panel)
    configure(panel, tmp_path, steps=4)
    existing = save_checkpoint(create_model("metastasis-small-10x"), tmp_path / "tuned.pt")
    before = existing.read_bytes()
    family, settings = panel.job_settings()
    assert family == "metastasis" and settings.out == tmp_path / "tuned-2.pt"
    assert settings.threads == 1 and not settings.overwrite
    assert "tuned.pt exists" in panel.status.text() and "tuned-2.pt" in panel.status.text()
    assert existing.read_bytes() == before


def test_closing_the_viewer_stops_the_job_and_saves(make_napari_viewer, qtbot, synthetic_slide, tmp_path):
    viewer = make_napari_viewer()
    [slide_layer] = viewer.open(str(synthetic_slide.slide_path), plugin=PLUGIN)
    add_regions(viewer, slide_layer, synthetic_slide, labels=("tumour",))
    _dock, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Train")
    configure(panel, tmp_path, steps=500)
    panel.start_button.click()
    job = panel.current_job
    qtbot.waitUntil(lambda: any("loss" in row for row in panel.history), timeout=WAIT_MS)
    viewer.close()
    assert job.stop_event.is_set()  # at once, by the panel's close hook
    assert job.wait(60)
    assert job.state.value == "stopped" and job.result.step < 500
    saved = load_checkpoint(checkpoint_paths(tmp_path / "tuned.pt")[1])
    assert saved.provenance["stopped"] is True and saved.provenance["step"] == job.result.step


# --------------------------------------------------------------------------- without Qt: normal regions
def test_normal_annotations_restrict_normal_patch_centres(synthetic_slide, tmp_path) -> None:
    box = normal_box_px(synthetic_slide)
    (x0, y0), (x1, y1) = box
    ring = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    normal = tmp_path / "normal.geojson"
    normal.write_text(json.dumps(polygons_to_geojson([[ring]], "Normal")))
    plain = SlideEntry(synthetic_slide.slide_path, "tumour", synthetic_slide.tumour_geojson)
    table = write_slide_table(
        [SlideEntry(plain.path, plain.label, plain.annotations, normal_annotations=normal)],
        tmp_path / "t.csv",
    )
    with open(table, newline="") as fh:
        assert next(csv.reader(fh)) == ["slide", "label", "annotations", "normal_annotations"]
    [restricted] = read_slide_table(table)
    assert restricted.normal_annotations == normal
    spec = get_spec("metastasis")
    [free] = run_to_completion(prepare_regions([plain], spec))
    [only] = run_to_completion(prepare_regions([restricted], spec))
    assert 0 < len(only.normal_px) < len(free.normal_px)
    cell_px = only.mask_mpp / only.slide.mpp[0]
    centres = (only.normal_px[:, ::-1] + 0.5) * cell_px  # (x, y) level-0 px
    assert (centres >= box[0] - cell_px).all() and (centres <= box[1] + cell_px).all()
    assert np.array_equal(only.tumour_px, free.tumour_px)


def test_shapes_to_polygons_skips_lines_and_reads_ellipses(make_napari_viewer, synthetic_slide) -> None:
    viewer = make_napari_viewer()
    [slide_layer] = viewer.open(str(synthetic_slide.slide_path), plugin=PLUGIN)
    box_um = np.array([[100.0, 100.0], [100.0, 300.0], [300.0, 300.0], [300.0, 100.0]])  # (y, x) corners
    shapes = viewer.add_shapes(
        [box_um, np.array([[0.0, 0.0], [50.0, 50.0]])],
        shape_type=["ellipse", "line"], features={"label": ["Normal", "tumour"]}, units=slide_layer.units,
    )  # fmt: skip
    regions, problems = shapes_to_polygons(shapes, slide_layer)
    assert regions["tumour"] == [] and len(regions["normal"]) == 1
    assert len(problems) == 1 and "line" in problems[0]
    ring = regions["normal"][0][0]  # an ellipse in a 200 um box at 0.5 um/px: 400 px across
    assert ring.min(0) == pytest.approx([200.5, 200.5], abs=1) and ring.max(0) == pytest.approx(
        [600.5, 600.5], abs=1
    )


# --------------------------------------------------------------------------- compute behind the panel (no Qt)
def test_panel_bookkeeping_without_qt(tmp_path):
    import math
    from types import SimpleNamespace

    from napari_pathology.families import get_family
    from napari_pathology.training.events import TrainingError
    from napari_pathology.training.panel_jobs import (
        JobRecord,
        checkpoint_text,
        curve_metric,
        format_eta,
        parse_setting,
        state_message,
        unique_name,
    )

    assert format_eta(math.inf) == "--:--" and format_eta(65.4) == "1:05" and format_eta(3725) == "1:02:05"

    def step(n, elapsed, total=10, eta=99.0):
        return SimpleNamespace(kind="step", step=n, elapsed=elapsed, total_steps=total, eta=eta)

    fresh = JobRecord(None, "toy", SimpleNamespace(resume=False))
    assert fresh.eta(step(1, 2.0)) == 99.0  # the loop's own ETA until a second step
    assert fresh.eta(step(3, 6.0)) == 2.0 * 7  # 2 s/step since the first step, 7 to go
    resumed = JobRecord(None, "toy", SimpleNamespace(resume=True))
    assert math.isinf(resumed.eta(step(5, 40.0)))  # its elapsed counts the skipped steps
    assert resumed.eta(step(6, 41.0)) == 4.0

    family = get_family("metastasis")
    lr = next(f for f in family.setting_fields() if f.name == "lr")
    assert parse_setting(family, lr, " ") is None and parse_setting(family, lr, "1e-4") == 1e-4
    for bad, message in (("abc", "not a number"), ("0", "must be positive"), ("-1", "must be positive")):
        with pytest.raises(TrainingError, match=f"Learning rate.*{message}"):
            parse_setting(family, lr, bad)

    (tmp_path / "tuned.pt").write_bytes(b"")
    assert unique_name("tuned", tmp_path, ()) == "tuned-2"
    assert unique_name("tuned", tmp_path, ("tuned-2",)) == "tuned-3"
    assert unique_name("other", tmp_path, ()) == "other"

    def job(name, state, step=None, error=None):
        return SimpleNamespace(
            name=name, device="cpu", state=SimpleNamespace(value=state), error=error,
            result=SimpleNamespace(step=step) if step is not None else None,
        )  # fmt: skip

    queued, ahead = job("b", "queued"), job("a", "running")
    assert state_message(queued, [ahead, queued]) == "b: queued behind a on cpu"
    assert state_message(queued, [queued]) == "" and state_message(ahead) == "a: running on cpu"
    assert state_message(job("c", "failed", error="out of memory")) == "c failed: out of memory"
    assert state_message(job("d", "stopped", step=7)) == "d: stopped at step 7; Resume continues it"
    assert state_message(job("e", "finished", step=9)) == "e: finished at step 9"

    rows = [{"step": 5, "auc": 0.7, "val_loss": 0.3}]
    assert curve_metric("auc", rows) == "auc" and curve_metric(None, rows) == "val_loss"
    assert curve_metric("auc", []) is None
    entry = {"kind": "best", "path": "/m/tuned.best.pt", "metrics": {"step": 4, "auc": 0.91234, "note": "x"}}
    assert checkpoint_text(entry) == "best: step 4, auc 0.912 - tuned.best.pt"


def test_drawn_regions_grouped_checked_and_written(tmp_path):
    from napari_pathology.training.events import TrainingError
    from napari_pathology.training.regions import (
        check_regions,
        check_slide_metadata,
        group_regions,
        region_label,
        write_region_data,
    )

    assert region_label(None) == region_label("") == region_label(" Tumour ") == "tumour"
    assert region_label("normal") == "normal" and region_label("stroma") is None
    ring = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0]])
    rings = [(0, ring, ""), (1, None, "shape 1 is a line"), (2, ring, ""), (3, ring, "")]
    regions, problems = group_regions(rings, [None, "tumour", "normal", "stroma"])
    assert [len(regions[k]) for k in ("tumour", "normal")] == [1, 1]
    assert problems == ["shape 1 is a line", "shape 3 has label 'stroma': use 'tumour' or 'normal'"]
    with pytest.raises(TrainingError, match="stroma"):
        check_regions("regions", regions, problems)
    with pytest.raises(TrainingError, match="normal regions only"):
        check_regions("regions", {"tumour": [], "normal": regions["normal"]}, [])
    with pytest.raises(TrainingError, match="no um/px"):
        check_slide_metadata("slide", {"mpp_missing": True, "mpp_x": 0.5})
    check_regions("regions", regions, [])

    slide = tmp_path / "slide.tif"
    slide.write_bytes(b"")
    meta = {"path": str(slide), "mpp_x": 0.5, "mpp_source": "user"}
    table = write_region_data(tmp_path / "out", "tuned", regions, meta)
    [entry] = read_slide_table(table)
    assert entry.is_tumour and entry.mpp == 0.5
    [[written]] = geojson_to_polygons(json.loads(entry.annotations.read_text()))
    assert np.allclose(written[: len(ring)], ring)
    assert entry.normal_annotations.name == "tuned.normal.geojson"


def test_settings_rows_are_generated_from_the_dataclass_without_qt():
    from napari_pathology.families import get_family
    from napari_pathology.training.events import TrainingError
    from napari_pathology.training.panel_jobs import (
        PANEL_SETTINGS,
        form_fields,
        parse_setting,
        setting_label,
        setting_range,
    )

    family = get_family("metastasis")
    fields = {f.name: f for f in form_fields(family)}
    assert not PANEL_SETTINGS & set(fields) and list(fields)[:2] == ["steps", "batch_size"]
    assert setting_label(family, fields["lr"]) == "Learning rate"
    assert setting_label(family, fields["batch_size"]) == "Batch size"
    assert setting_range(family, fields["steps"]) == (0, 1e9, 1)
    assert setting_range(family, fields["hard_negative_fraction"]) == (0.0, 1.0, 0.05)
    purity = get_family("nucleus-purity")
    context = next(f for f in purity.setting_fields() if f.name == "context_um")
    assert setting_label(purity, context) == "Context (um)"
    decay = next(f for f in purity.setting_fields() if f.name == "weight_decay")
    assert setting_range(purity, decay)[2] == pytest.approx(1e-4)
    classes = next(f for f in get_family("tumor-normal").setting_fields() if f.name == "classes")
    assert parse_setting(family, classes, " LUAD, LUSC ,") == ("LUAD", "LUSC")
    assert parse_setting(family, classes, "") is None
    steps = fields["eval_every"]
    with pytest.raises(TrainingError, match="needs a value"):
        parse_setting(family, steps, "")


def test_the_form_follows_the_family_and_reads_back_typed_values(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    panel = TrainPanel(viewer)
    qtbot.addWidget(panel)
    panel.select_family("metastasis")
    assert panel.setting_widget("steps").value == 2000 and panel.setting_widget("lr").value == ""
    assert "0.05" in panel.setting_widget("lr").native.placeholderText()  # the paper's default, said
    panel.setting_widget("lr").value = "0.01"
    panel.setting_widget("amp").value = False
    values = panel.settings_values()
    assert values["lr"] == 0.01 and values["amp"] is False and values["steps"] == 2000
    panel.select_family("tumor-normal")
    assert panel.setting_widget("lr").value == pytest.approx(1e-4)  # a spin box shows 0.0001 exactly
    with pytest.raises(KeyError, match="no setting 'steps'"):
        panel.setting_widget("steps")
    panel.setting_widget("classes").value = "LUAD, LUSC"
    assert panel.settings_values()["classes"] == ("LUAD", "LUSC")
    panel.select_family("metastasis")  # rows rebuilt from the defaults
    assert panel.setting_widget("lr").value == "" and panel.setting_widget("amp").value is True


def test_curve_plot_draws_names_and_reads_out_the_point_under_the_mouse(qtbot):
    import pyqtgraph as pg

    from napari_pathology._widgets.train_curves import CurvePlot

    plot = CurvePlot("training loss")
    qtbot.addWidget(plot)
    plot.resize(320, 220)
    plot.show()
    assert plot.empty_label.isVisible() and not plot.legend.isVisible()
    plot.set_points([(0, 1.0), (10, float("nan")), (20, 0.5)], "validation auc")
    xs, ys = plot.curve.getData()
    assert xs.tolist() == [0, 20] and ys.tolist() == [1.0, 0.5]  # the NaN is left out
    assert not plot.empty_label.isVisible() and plot.legend.isVisible()
    assert [label.text for _sample, label in plot.legend.items] == ["validation auc"]
    assert plot.getPlotItem().getAxis("left").labelText == "validation auc"
    qtbot.wait(50)
    view = plot.getPlotItem().getViewBox()
    plot._hover(view.mapViewToScene(pg.Point(19.0, 0.52)))
    assert plot.readout.toPlainText() == "step 20: 0.5"
    plot.set_points([])
    assert plot.readout.toPlainText() == "" and plot.empty_label.isVisible()


def test_a_subtype_table_reaches_clam_with_its_three_classes(make_napari_viewer, qtbot, tmp_path):
    """A table labelled normal / tumour_a / tumour_b is read with its labels; the job carries them."""
    rows = ["slide,label"]
    for k in range(3):
        for label in ("tumour_b", "normal", "tumour_a"):
            slide = tmp_path / f"{label}-{k}.tif"
            slide.write_bytes(b"")  # the table is read and checked, no pixel is: the job is not started
            rows.append(f"{slide.name},{label}")
    table = tmp_path / "slides.csv"
    table.write_text("\n".join(rows) + "\n")
    viewer = make_napari_viewer()
    panel = TrainPanel(viewer)
    qtbot.addWidget(panel)
    panel.select_family("clam")
    panel.set_source("table")
    panel.table_edit.setText(str(table))
    panel.out_edit.setText(str(tmp_path / "models"))
    panel.setting_widget("val_fraction").value = 0.0
    family, settings = panel.job_settings()
    assert family == "clam" and settings.classes == ("normal", "tumour_a", "tumour_b")
    assert settings.data == table
    panel.setting_widget("classes").value = "tumour_b, tumour_a, normal"  # the form's order is kept
    assert panel.job_settings()[1].classes == ("tumour_b", "tumour_a", "normal")
    panel.setting_widget("classes").value = "normal, tumour_a"  # a label outside the form's classes
    with pytest.raises(Exception, match="unknown label 'tumour_b'"):
        panel.job_settings()
    panel.select_family("tumor-normal")  # its settings take classes too: the table's labels, in its order
    panel.set_source("table")
    panel.table_edit.setText(str(table))
    panel.setting_widget("val_fraction").value = 0.0
    assert panel.job_settings()[1].classes == ("tumour_b", "normal", "tumour_a")
    panel.select_family("metastasis")  # no classes: tumour/normal labels only
    panel.set_source("table")
    panel.table_edit.setText(str(table))
    with pytest.raises(Exception, match="labels must be tumour or normal"):
        panel.job_settings()


def test_table_labels_fold_spellings_and_leave_tumour_normal_tables_alone(tmp_path):
    from napari_pathology.cohort import table_labels

    def table(labels: list[str]):
        rows = ["slide,label"]
        for k, label in enumerate(labels):
            (tmp_path / f"s{k}.tif").write_bytes(b"")
            rows.append(f"s{k}.tif,{label}")
        (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
        return tmp_path / "t.csv"

    assert table_labels(table(["Tumor", "normal", "tumour", ""])) is None
    labels = table_labels(table(["Normal", "tumour_a", "normal", "tumor", "TUMOUR_A"]))
    assert labels == ("Normal", "tumour_a", "tumor")
    assert [e.label for e in read_slide_table(tmp_path / "t.csv", classes=labels)][:4] == [
        "Normal", "tumour_a", "Normal", "tumor",
    ]  # fmt: skip
