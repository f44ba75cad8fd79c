"""The encoder registry and the rules for weights on disk: torch's cache or a path, never a download."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_pathology.features import EncoderError, get_encoder, list_encoders, register_encoder
from napari_pathology.features import encoders as registry
from napari_pathology.features.backbones import ResNet50Trunc, cached_torchvision

V1 = "resnet50-0676ba61.pth"


def _models():
    from napari_pathology._native import import_torchvision

    return import_torchvision("torchvision.models")


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random (seeded) full ResNet-50 state dict, saved once as torchvision names it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / V1
    torch.save(_models().resnet50(weights=None).state_dict(), path)
    return path


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch cache (``TORCH_HOME``); returns its ``hub/checkpoints`` folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


@pytest.mark.slow  # a full ResNet-50 state dict is saved and loaded
def test_resnet50_trunc_finds_torchvision_weights_in_torch_cache(torch_home, resnet50_file) -> None:
    (torch_home / V1).symlink_to(resnet50_file)
    entry = next(e for e in list_encoders() if e.name == "resnet50-trunc")
    assert (entry.dim, entry.patch_size, entry.mpp, entry.normalization) == (1024, 256, 0.5, "imagenet")
    assert entry.default_weights() == torch_home / V1
    encoder = get_encoder("resnet50-trunc")
    assert encoder.trained and encoder.provenance["weights"] == str(torch_home / V1)
    saved = torch.load(resnet50_file, weights_only=True)
    assert torch.equal(encoder.net.conv1.weight, saved["conv1.weight"])
    assert torch.equal(encoder.net.layer3[5].bn3.running_var, saved["layer3.5.bn3.running_var"])


@pytest.mark.slow  # a full ResNet-50 state dict is saved and loaded
def test_resnet50_trunc_gives_1024_features_of_layer3_pooled(torch_home, resnet50_file) -> None:
    encoder = get_encoder("resnet50-trunc", weights=resnet50_file)
    tiles = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    features = encoder.embed(tiles)
    assert features.shape == (2, 1024) and features.dtype == np.float32 and np.isfinite(features).all()
    resnet = _models().resnet50(weights=None)  # the same computation written out from torchvision's parts
    resnet.load_state_dict(torch.load(resnet50_file, weights_only=True))
    resnet.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        expected = resnet.layer3(resnet.layer2(resnet.layer1(x))).mean((2, 3))
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # a full ResNet-50 state dict is saved and loaded
def test_a_truncated_state_dict_loads_too(tmp_path, resnet50_file) -> None:
    full = _models().resnet50(weights=None)
    full.load_state_dict(torch.load(resnet50_file, weights_only=True))
    torch.save(ResNet50Trunc(full).state_dict(), tmp_path / "trunc.pth")
    encoder = get_encoder("resnet50-trunc", weights=tmp_path / "trunc.pth")
    assert encoder.trained and torch.equal(encoder.net.conv1.weight, full.conv1.weight)


def test_without_weights_the_encoder_says_it_is_untrained(torch_home, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        encoder = get_encoder("resnet50-trunc")
    assert not encoder.trained and encoder.provenance["trained"] is False
    assert encoder.provenance["weights"] is None
    assert "UNTRAINED" in caplog.text and str(torch_home) in caplog.text


def test_a_wrong_weights_file_is_one_clear_error(torch_home, tmp_path) -> None:
    torch.save(_models().resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(EncoderError, match=r"resnet18\.pth does not hold ResNet-50 weights: .*with another"):
        get_encoder("resnet50-trunc", weights=tmp_path / "resnet18.pth")
    (torch_home / V1).write_bytes(b"not a checkpoint at all")  # a broken file in the cache is refused too
    with pytest.raises(EncoderError, match=rf"{V1} is not a PyTorch weights file"):
        get_encoder("resnet50-trunc")
    torch.save({"epoch": 3}, tmp_path / "dict.pth")
    with pytest.raises(EncoderError, match="does not hold a state dict"):
        get_encoder("resnet50-trunc", weights=tmp_path / "dict.pth")
    with pytest.raises(EncoderError, match="not found"):
        get_encoder("resnet50-trunc", weights=tmp_path / "missing.pth")


@pytest.mark.slow  # builds three networks
def test_any_torchvision_backbone_by_name(torch_home) -> None:
    torch.manual_seed(1)
    net = _models().resnet18(weights=None)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}},
               torch_home / "resnet18-f37072fd.pth")  # fmt: skip
    assert cached_torchvision() == {"resnet18": torch_home / "resnet18-f37072fd.pth"}
    encoder = get_encoder("torchvision:resnet18")
    assert encoder.trained and encoder.dim == 512 and encoder.name == "torchvision:resnet18"
    assert torch.equal(encoder.net.layer4[1].conv2.weight, net.layer4[1].conv2.weight)
    out = encoder.embed(np.zeros((2, 64, 64, 3), np.uint8))
    assert out.shape == (2, 512)
    untrained = get_encoder("torchvision:mobilenet_v3_small", device="cpu")
    assert not untrained.trained and untrained.dim == 1024  # what fed its last linear layer
    with pytest.raises(EncoderError, match="no linear classifier"):
        get_encoder("torchvision:squeezenet1_1")


def test_unknown_names_are_refused_with_the_known_ones() -> None:
    with pytest.raises(EncoderError, match=r"unknown encoder 'nope' \(known: .*resnet50-trunc"):
        get_encoder("nope")
    with pytest.raises(EncoderError, match="unknown torchvision model 'resnet9000'"):
        get_encoder("torchvision:resnet9000")
    with pytest.raises(EncoderError, match="unknown encoder prefix 'timm'"):
        get_encoder("timm:vit")


def test_a_name_is_registered_once(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_ENCODERS", dict(registry._ENCODERS))  # leave the real registry alone

    def build(weights):
        raise AssertionError("not built")

    register_encoder("test-enc", build, dim=8, patch_size=32, mpp=1.0)
    register_encoder("test-enc", build, dim=8, patch_size=32, mpp=1.0)  # the same builder again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("test-enc", lambda weights: None, dim=8, patch_size=32, mpp=1.0)
    with pytest.raises(ValueError, match="without ':'"):
        register_encoder("a:b", build, dim=8, patch_size=32, mpp=1.0)
