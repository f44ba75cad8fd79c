"""The whole-slide network: frozen BatchNorm, global max pooling, class activation maps, its spec."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_pathology.families.wholeslide.model import (
    AffineBatchNorm2d,
    WholeSlideNet,
    build_wholeslide,
    freeze_batch_norm,
)
from napari_pathology.models.registry import create_model, get_spec


def _net(**kw) -> WholeSlideNet:
    return WholeSlideNet(**{"num_classes": 3, "arch": "resnet18", "width": 4, **kw})


def test_no_batch_statistics_in_training_mode() -> None:
    net = _net()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    for m in net.modules():  # statistics that matter
        if isinstance(m, AffineBatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 96, 64)
    net.train()
    both = net(x)
    alone = torch.cat([net(x[:1]), net(x[1:])])  # batch statistics would make these differ
    net.eval()
    torch.testing.assert_close(both, alone)
    torch.testing.assert_close(net(x), both)
    assert both.shape == (2, 3)


def test_freeze_batch_norm_keeps_statistics_and_trains_affine() -> None:
    bn = nn.BatchNorm2d(5)
    bn.train()
    bn(torch.randn(8, 5, 6, 6) * 3 + 1)  # real running statistics
    bn.eval()
    wrapped = freeze_batch_norm(nn.Sequential(bn))
    frozen = wrapped[0]
    assert isinstance(frozen, AffineBatchNorm2d)
    x = torch.randn(2, 5, 4, 4)
    torch.testing.assert_close(frozen(x), bn(x))
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["weight", "bias"]
    fixed = freeze_batch_norm(nn.Sequential(nn.BatchNorm2d(5)), trainable_affine=False)[0]
    assert not any(p.requires_grad for p in fixed.parameters())
    frozen.load_state_dict(bn.state_dict())  # BatchNorm2d's names, num_batches_tracked ignored


def test_global_max_pooling_and_cam() -> None:
    torch.manual_seed(0)
    net = _net().eval()
    x = torch.randn(1, 3, 160, 128)
    with torch.no_grad():
        fmap = net.features(x)
        assert fmap.shape == (1, net.num_features, 5, 4)
        torch.testing.assert_close(net(x), net.fc(fmap.amax(dim=(2, 3))))
        cam = net.cam(fmap, 2)
        expected = torch.einsum("chw,c->hw", fmap[0], net.fc.weight[2]) + net.fc.bias[2]
        torch.testing.assert_close(cam[0], expected)
        predicted = int(net(x).argmax())
        torch.testing.assert_close(net.cam(fmap), net.cam(fmap, predicted))
    with pytest.raises(ValueError, match="class index 3"):
        net.cam(fmap, 3)


def test_narrow_network_is_the_same_code_path() -> None:
    net = _net(arch="resnet50", width=2)
    assert type(net.layer1[0]).__name__ == "Bottleneck"
    assert net.conv1.out_channels == 2 and net.num_features == 8 * 2 * 4
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 3)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"arch": "vgg16"}, "arch must be one of"),
        ({"width": 0}, "width must be"),
        ({"width": True}, "width must be"),
    ],
)
def test_bad_config(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _net(**kw)


def test_random_start_without_imagenet_on_disk(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    net = build_wholeslide(2, "resnet18", 64, imagenet=True)
    assert net.provenance.startswith("random initialisation")


def test_imagenet_weights_from_disk(tmp_path, monkeypatch) -> None:
    from napari_pathology.features.backbones import _weight_files

    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        reference.conv1.weight.fill_(0.25)
        reference.bn1.running_var.fill_(4.0)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / _weight_files("resnet18")[0])
    net = build_wholeslide(2, "resnet18", 64, imagenet=True)
    assert net.provenance.startswith("ImageNet weights")
    assert torch.all(net.conv1.weight == 0.25) and torch.all(net.bn1.running_var == 4.0)
    assert net.fc.out_features == 2


def test_registered_spec_builds() -> None:
    spec = get_spec("wholeslide-resnet50")
    assert spec.family == "wholeslide" and spec.output == "slide" and spec.mpp == 2.5
    model = create_model(spec.replace(config={"arch": "resnet18", "width": 2}))
    assert model.net.fc.out_features == spec.n_classes


def test_a_fresh_network_starts_well_scaled_from_data() -> None:
    from napari_pathology.families.wholeslide.model import AffineBatchNorm2d

    net = WholeSlideNet(3, "resnet18", 8)
    x = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    net.initialise_from_data(x)
    seen = {}

    def record(module, inputs, output):
        seen[module] = output.clone()  # (the ReLU after it works in place)

    hooks = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, AffineBatchNorm2d)]
    with torch.no_grad():
        net.features(x)
    for hook in hooks:
        hook.remove()
    first = seen[net.bn1]  # every frozen batch norm now normalises this data: mean 0, variance 1
    assert abs(float(first.mean())) < 1e-4 and abs(float(first.var(unbiased=False)) - 1) < 1e-3
    blocks = [net.layer1[0], net.layer4[-1]]
    assert all(float(block.bn2.weight.abs().max()) == 0 for block in blocks)  # residual blocks: identities
    assert all(block.bn2.weight.requires_grad for block in blocks)  # and they still learn
