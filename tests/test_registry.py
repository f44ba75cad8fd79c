"""Model registry, specs, checkpoints and the baseline model (CPU, no downloads, no Qt)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from napari_pathology.geometry import geojson_to_polygons, rasterize_polygons
from napari_pathology.models import (
    ModelError,
    ModelSpec,
    PathologyModel,
    checkpoint_info,
    create_model,
    get_spec,
    list_families,
    list_models,
    load_checkpoint,
    register_model,
    resolve_model,
    save_checkpoint,
)
from napari_pathology.slide import open_slide
from napari_pathology.tiles import TileLoader, make_tile_grid, tissue_fractions, to_tensor, tta_mean

# A tiny family whose weight shapes depend on its config (for mismatch tests).
TEST_SPEC = ModelSpec(
    name="test-linear",
    family="test-linear",
    task="unit tests",
    classes=("a", "b", "c"),
    input_size=8,
    mpp=1.0,
    normalization="unit",
    config={"hidden": 4},
)


@register_model(TEST_SPEC)
def build_test_linear(hidden: int = 4, num_classes: int = 2) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 8 * 8, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


def batch(n: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- specs


def test_spec_round_trip_and_validation() -> None:
    spec = ModelSpec(
        name="m", family="metastasis", task="t", classes=["normal", "tumour"], input_size=299, mpp=0.25,
        centre_size=128, normalization="liu", tta=True, config={"depth": (1, 2), "nested": {"w": 0.5}},
    )  # fmt: skip
    assert spec.classes == ("normal", "tumour") and spec.config["depth"] == [1, 2]
    assert spec.default_stride == 128 and spec.positive_index == 1 and spec.n_classes == 2
    data = spec.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert ModelSpec.from_dict(data) == spec
    assert hash(spec) == hash(ModelSpec.from_dict(data))
    assert spec.replace(stride=64).default_stride == 64
    assert spec.replace(positive_class="normal").positive_index == 0

    bad = {
        "normalization": ("zscore", "normalization"),
        "output": ("mask", "output"),
        "aggregator": ("median", "aggregator"),
        "positive_class": ("other", "positive_class"),
        "centre_size": (512, "centre_size"),
        "input_size": (0, "input_size"),
        "mpp": (-1, "mpp"),
        "classes": (["only"], "classes"),
        "tta": ("yes", "tta"),
    }
    for field, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            spec.replace(**{field: value})
    with pytest.raises(ValueError, match="lacks mpp"):
        ModelSpec.from_dict({k: v for k, v in data.items() if k != "mpp"})
    with pytest.raises(ValueError, match="unknown field"):
        ModelSpec.from_dict({**data, "colour": "red"})
    with pytest.raises(ValueError, match="cannot be stored"):
        spec.replace(config={"f": object()})


def test_list_get_create() -> None:
    names = [s.name for s in list_models()]
    assert names == sorted(names)
    assert {"nuclear-density", "nuclear-density-fine", "test-linear"} <= set(names)
    assert "baseline" in list_families()
    spec = get_spec("nuclear-density")
    assert (spec.family, spec.classes, spec.input_size, spec.mpp) == (
        "baseline",
        ("normal", "tumour"),
        64,
        2.0,
    )
    assert spec.normalization == "unit" and spec.tta and "not a trained model" in spec.description
    model = create_model("nuclear-density")
    assert isinstance(model, PathologyModel) and model.spec == spec and not model.training
    x = batch(2, 64)
    assert model(x).shape == (2, 2)
    probs = model.predict_proba(x)
    assert torch.allclose(probs.sum(1), torch.ones(2))

    linear = create_model("test-linear", hidden=6)  # config override, num_classes from the spec
    assert linear.spec.config == {"hidden": 6} and linear.net[1].out_features == 6
    assert linear(batch()).shape == (3, 3)
    with pytest.raises(ModelError, match="does not fit family"):
        create_model("test-linear", width=3)
    with pytest.raises(ModelError, match="family 'nope'"):
        create_model(TEST_SPEC.replace(name="x", family="nope"))


def test_unknown_name_lists_the_available_models() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'inception'.*nuclear-density") as info:
        get_spec("inception")
    assert isinstance(info.value, ValueError)
    with pytest.raises(ModelError, match=r"neither a registered model.*nuclear-density"):
        resolve_model("inception")
    with pytest.raises(ModelError, match="already registered"):
        register_model(TEST_SPEC.replace(input_size=16))(build_test_linear)


# --------------------------------------------------------------------------- checkpoints


def trained_baseline() -> PathologyModel:
    model = create_model("nuclear-density")
    with torch.no_grad():  # pretend training moved the head
        model.net.head.weight.fill_(11.0)
        model.net.head.bias.fill_(-4.0)
    return model


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = trained_baseline()
    provenance = {"epochs": 3, "data": Path("/data/slides")}
    metrics = {"auc": np.float32(0.75), "roc": np.array([0.0, 0.5])}
    path = save_checkpoint(model, tmp_path / "ckpt" / "baseline.pt", provenance=provenance, metrics=metrics)
    assert path == tmp_path / "ckpt" / "baseline.pt"
    loaded = load_checkpoint(path)
    assert loaded.spec == model.spec and not loaded.training and loaded.source == str(path)
    assert loaded.provenance["epochs"] == 3 and loaded.provenance["data"] == "/data/slides"
    assert "saved_at" in loaded.provenance
    assert loaded.metrics == {"auc": pytest.approx(0.75), "roc": [0.0, 0.5]}
    x = batch(4, 64)
    assert torch.equal(loaded(x), model(x))
    assert not torch.equal(create_model("nuclear-density")(x), model(x))

    info = checkpoint_info(path)
    assert info["spec"] == model.spec.to_dict() and info["metrics"]["auc"] == pytest.approx(0.75)
    assert info["format"] == "napari-pathology-checkpoint" and info["version"] == 1
    assert torch.equal(resolve_model(str(path))(x), model(x))
    assert resolve_model("nuclear-density").spec.name == "nuclear-density"


def tamper(path: Path, edit) -> Path:
    """An edited copy, without the weights digest (as a file written by another tool would be)."""
    data = torch.load(path, weights_only=True)
    data.pop("weights_sha256")
    edit(data)
    out = path.with_name("tampered.pt")
    torch.save(data, out)
    return out


def test_weights_that_do_not_match_the_spec_are_refused(tmp_path: Path) -> None:
    path = save_checkpoint(create_model("test-linear"), tmp_path / "linear.pt")

    def drop(d):
        del d["state_dict"]["net.3.bias"]

    def extra(d):
        d["state_dict"]["net.9.weight"] = torch.zeros(2)

    def reshape(d):
        d["spec"]["config"]["hidden"] = 5

    def family(d):
        d["spec"]["family"] = "vision-transformer"

    def spec(d):
        d["spec"]["mpp"] = "fast"

    cases = [
        (drop, r"missing weights net\.3\.bias"),
        (extra, r"unexpected weights net\.9\.weight"),
        (reshape, r"shape mismatch net\.1\.weight \(4, 192\) vs \(5, 192\)"),
        (family, "family 'vision-transformer'.*known families"),
        (spec, "invalid model spec.*mpp"),
    ]
    for edit, message in cases:
        bad = tamper(path, edit)
        with pytest.raises(ModelError, match=f"tampered.pt: .*{message}"):
            load_checkpoint(bad)


def test_files_that_are_not_checkpoints_are_refused(tmp_path: Path) -> None:
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = tmp_path / "model.json"
    text.write_text(json.dumps({"format": "napari-pathology-checkpoint"}))
    bare = tmp_path / "bare.pt"
    torch.save(create_model("test-linear").state_dict(), bare)
    other = tmp_path / "other.pt"
    torch.save({"weights": [1, 2, 3]}, other)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "napari-pathology-checkpoint", "spec": Path("x")}, unsafe)
    cases = [
        (noise, "noise.pt: not a PyTorch checkpoint"),
        (text, r"model.json: not a PyTorch checkpoint file \(a JSON file"),
        (bare, "bare.pt: it is a bare state_dict"),
        (other, "other.pt: it is a PyTorch file but not a napari-pathology-checkpoint"),
        (unsafe, r"unsafe.pt: it holds code \(pickled objects\) that napari-pathology will not run"),
        (tmp_path / "missing.pt", "missing.pt: no such file"),
        (tmp_path, "it is a folder"),
    ]
    for path, message in cases:
        with pytest.raises(ModelError, match=message):
            load_checkpoint(path)
        with pytest.raises(ModelError, match=message):
            checkpoint_info(path)
    with pytest.raises(ModelError, match=r"missing\.pt: no such file"):
        resolve_model(str(tmp_path / "missing.pt"))


def test_atomic_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "model.pt"
    first = trained_baseline()
    save_checkpoint(first, path)
    save_checkpoint(first, path)  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]

    def broken_save(obj, fh, *args, **kwargs):
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(create_model("nuclear-density"), path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left
    x = batch(2, 64)
    assert torch.equal(load_checkpoint(path)(x), first(x))


# --------------------------------------------------------------------------- baseline on a synthetic slide


class PngMask:
    def __init__(self, mask: np.ndarray, mpp: float) -> None:
        self.mask, self.mpp = mask, mpp


def test_baseline_scores_tumour_above_normal_tissue(synthetic_slide) -> None:
    truth = synthetic_slide
    model = create_model("nuclear-density")
    spec = model.spec
    slide = open_slide(truth.slide_path)
    tissue = PngMask(np.asarray(Image.open(truth.tissue_png)) > 0, truth.mask_mpp)
    grid = make_tile_grid(slide, spec.mpp, spec.input_size, spec.input_size // 2, tissue=tissue,
                          min_tissue_fraction=0.5, tissue_region_size=spec.input_size)  # fmt: skip

    # tumour fraction of each whole tile, from the GeoJSON polygons (level-0 px)
    polygons = geojson_to_polygons(json.loads(Path(truth.tumour_geojson).read_text()))
    step = 8  # level-0 px per truth-mask pixel
    shape = (truth.height // step, truth.width // step)
    tumour = PngMask(rasterize_polygons(polygons, shape, scale=step), step * truth.mpp)
    origins = grid.origins_um
    fraction = tissue_fractions(tumour, origins[:, 0], origins[:, 1], grid.tile_um)

    probs = []
    with TileLoader(slide, grid, batch_size=64, workers=2) as loader:
        for _, tiles in loader:
            x = to_tensor(tiles, spec.normalization)
            probs.append(model.predict_proba(x)[:, spec.positive_index])
            with torch.inference_mode():  # the model is (nearly) orientation invariant
                assert torch.allclose(tta_mean(model.predict_proba, x)[:, 1], probs[-1], atol=0.05)
    p = torch.cat(probs).numpy()
    inside, outside = fraction >= 0.9, fraction == 0
    assert inside.sum() >= 5 and outside.sum() >= 50
    assert p[inside].mean() > p[outside].mean() + 0.5
    assert (p[inside] > 0.5).mean() >= 0.8
    assert np.median(p[outside]) < 0.1


def test_registry_module_reexports_the_split_modules() -> None:
    """``models.registry`` still offers every name it had before the split, as the same objects."""
    import napari_pathology.models as models
    from napari_pathology.models import checkpoint, factory, registry, spec

    homes = {
        spec: ("AGGREGATORS", "OUTPUTS", "ModelError", "ModelSpec"),
        checkpoint: (
            "CHECKPOINT_FORMAT",
            "CHECKPOINT_SUFFIXES",
            "CHECKPOINT_VERSION",
            "checkpoint_info",
            "load_untrusted",
            "refused_as_code",
            "save_checkpoint",
            "save_torch_file",
            "tensors_digest",
        ),
        factory: ("PathologyModel", "create_model", "load_checkpoint", "resolve_model"),
    }
    for module, names in homes.items():
        for name in names:
            assert getattr(registry, name) is getattr(module, name), name
    for name in registry.__all__:
        assert getattr(registry, name) is getattr(models, name, getattr(registry, name)), name
    with pytest.raises(AttributeError):
        registry.no_such_name  # noqa: B018
    for module in (spec, checkpoint, factory, registry):
        assert len(Path(module.__file__).read_text().splitlines()) <= 600, module.__name__
