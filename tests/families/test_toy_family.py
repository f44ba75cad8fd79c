"""A third-party family, installed in a temporary folder, shows up everywhere without any other change.

The toy package and its ``napari_pathology.families`` entry point are written
to ``tmp_path`` (a ``*.dist-info`` folder, as pip would install it) and the
folder is put on ``sys.path``; nothing else is touched. It must then be in
``napari-pathology models``, ``napari-pathology train --help``, the Train
panel's family list and the Analyze panel's model list.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

TOY = '''
"""A toy family: mean colour of a tile -> tumour/normal."""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from napari_pathology.families import Family
from napari_pathology.models.registry import ModelSpec, register_model


@dataclass(frozen=True)
class ToyTraining:
    """Settings of the toy trainer.

    Parameters
    ----------
    data : Path
        Slide table.
    out : Path
        Best checkpoint.
    start : str
        Registry name to start from.
    epochs : int
        Passes over the data.
    toy_strength : float
        How hard the toy tries.
    """

    data: Path
    out: Path
    start: str = "toy-net"
    epochs: int = 3
    toy_strength: float = 0.5


class ToyNet(nn.Module):
    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.head = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


class ToyFamily(Family):
    name = "toy"
    input_kind = "tile"
    title = "toy tile classifier"
    settings = ToyTraining
    data_sources = ("slide_table",)
    best_metric = "val_loss"

    def register_models(self) -> None:
        register_model(ModelSpec(
            name="toy-net", family="toy", task="toy", classes=("normal", "tumour"), input_size=32,
            mpp=2.0, stride=32, output="heatmap", aggregator="max", positive_class="tumour",
            description="a toy tile classifier",
        ))(ToyNet)

    def train(self, settings, data, out, stop=None):
        yield from ()
        raise NotImplementedError


FAMILY = ToyFamily()
'''


@pytest.fixture
def toy_installed(tmp_path, monkeypatch):
    """The toy package and its entry point in a temporary site folder; registries restored after."""
    from napari_pathology import families
    from napari_pathology.models import registry

    site = tmp_path / "site"
    (site / "toy_family").mkdir(parents=True)
    (site / "toy_family" / "__init__.py").write_text(textwrap.dedent(TOY))
    info = site / "toy_family-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-family\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[napari_pathology.families]\ntoy = toy_family:FAMILY\n")
    saved = (
        dict(families._FAMILIES), set(families._LOADED), dict(registry._BUILDERS), dict(registry._SPECS),
        dict(registry._PRETRAINED),
    )  # fmt: skip
    monkeypatch.syspath_prepend(str(site))
    yield site
    families._FAMILIES.clear()
    families._FAMILIES.update(saved[0])
    families._LOADED.clear()
    families._LOADED.update(saved[1])
    for target, old in zip(
        (registry._BUILDERS, registry._SPECS, registry._PRETRAINED), saved[2:], strict=True
    ):
        target.clear()
        target.update(old)
    sys.modules.pop("toy_family", None)


def test_the_toy_family_is_found_by_its_entry_point(toy_installed) -> None:
    from napari_pathology.families import get_family, list_families

    assert "toy" in [f.name for f in list_families()]
    toy = get_family("toy")
    assert toy.input_kind == "tile" and toy.defaults()["toy_strength"] == 0.5
    assert [f.flag for f in toy.setting_fields()] == ["--start", "--epochs", "--toy-strength"]


def test_the_toy_family_is_in_models_and_train_help(toy_installed, capsys) -> None:
    from napari_pathology.cli import main

    assert main(["models"]) == 0
    assert "toy-net\ttoy\t" in capsys.readouterr().out
    try:
        assert main(["train", "--help"]) == 0
    except SystemExit as done:
        assert done.code == 0
    text = capsys.readouterr().out
    assert "toy" in text and "--toy-strength" in text and "How hard the toy tries" in text


def test_a_flag_of_another_family_is_refused_by_name(toy_installed, tmp_path, capsys) -> None:
    from napari_pathology.cli import main

    args = ["train", "toy", "--data", str(tmp_path / "t.csv"), "--out", str(tmp_path / "m.pt")]
    assert main([*args, "--steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "--steps is not a setting of toy" in err


def test_the_toy_family_is_in_the_train_and_analyze_panels(toy_installed, make_napari_viewer) -> None:
    from napari_pathology._widgets.analyze_panel import AnalyzePanel
    from napari_pathology._widgets.train_panel import TrainPanel

    viewer = make_napari_viewer()
    train = TrainPanel(viewer)
    families = [train.family_combo.itemData(i) for i in range(train.family_combo.count())]
    assert "toy" in families
    train.select_family("toy")
    assert train.setting_widget("epochs").value == 3  # the toy's defaults, from its dataclass
    assert train.setting_widget("toy_strength").value == 0.5
    assert train.setting_widget("toy_strength").tooltip.startswith("How hard the toy tries")
    analyze = AnalyzePanel(viewer)
    models = [analyze.model_combo.itemData(i) for i in range(analyze.model_combo.count())]
    assert "toy-net" in models
