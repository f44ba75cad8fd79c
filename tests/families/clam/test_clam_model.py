"""CLAM's network and losses: shapes, attention pooling, instance clustering, the smooth top-1 SVM."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from napari_pathology.families.base import setting_fields
from napari_pathology.families.clam import FAMILY as CLAM
from napari_pathology.families.clam.losses import clam_loss, smooth_top1_svm
from napari_pathology.families.clam.model import ClamNet
from napari_pathology.models.registry import create_model, get_spec

EMBED = 20


def _net(n_classes: int = 2, model_type: str = "sb", **kw) -> ClamNet:
    torch.manual_seed(0)
    return ClamNet(n_classes, model_type, embed_dim=EMBED, **kw).eval()


def _bag(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, EMBED, generator=torch.Generator().manual_seed(seed))


def _hidden(net: ClamNet, bag: torch.Tensor) -> torch.Tensor:
    return net.attention_net[2](net.attention_net[1](net.attention_net[0](bag)))


@pytest.mark.parametrize("model_type", ["sb", "mb"])
@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize(("size", "dims"), [("small", (512, 256)), ("big", (512, 384))])
def test_shapes_of_every_variant(model_type, gate, size, dims):
    net = _net(3, model_type, gate=gate, size=size)
    assert (net.hidden, net.attention_dim) == dims
    out = net.run(_bag(17), instance_eval=True)
    branches = 3 if model_type == "mb" else 1
    assert out.logits.shape == (1, 3) and out.probabilities.shape == (1, 3)
    assert out.attention.shape == (branches, 17)
    assert out.instance_losses.shape == (3,) and torch.isfinite(out.instance_losses).all()
    assert torch.allclose(out.probabilities.sum(), torch.tensor(1.0))
    assert torch.equal(net(_bag(17)[None]), out.logits)  # a leading batch axis of one is dropped
    assert out.class_attention(2).shape == (17,)


@pytest.mark.parametrize("model_type", ["sb", "mb"])
def test_attention_is_a_softmax_over_the_patches_and_pooling_is_order_free(model_type):
    net = _net(3, model_type)
    bag = _bag(25)
    out = net.run(bag)
    weights = F.softmax(out.attention, dim=1)
    assert torch.allclose(weights.sum(dim=1), torch.ones(weights.shape[0]))
    slide = weights @ _hidden(net, bag)  # the attention-weighted mean of the patch embeddings
    if model_type == "sb":
        expected = net.classifiers(slide)
    else:
        expected = torch.stack([net.classifiers[c](slide[c])[0] for c in range(3)])[None]
    assert torch.allclose(out.logits, expected, atol=1e-6)
    order = torch.randperm(25, generator=torch.Generator().manual_seed(1))
    shuffled = net.run(bag[order])
    assert torch.allclose(shuffled.logits, out.logits, atol=1e-5)
    assert torch.allclose(shuffled.attention, out.attention[:, order], atol=1e-6)


def _expected_instance_loss(net: ClamNet, bag: torch.Tensor, label: int, k: int) -> torch.Tensor:
    """CLAM's instance loss written out: top-k positives and bottom-k negatives of the label's branch."""
    h = _hidden(net, bag)
    attention = net.run(bag).attention

    def branch(c: int) -> torch.Tensor:
        return attention[c if attention.shape[0] > 1 else 0]

    def in_class(c: int) -> torch.Tensor:
        order = torch.argsort(branch(c), descending=True)
        chosen = torch.cat([order[:k], order[-k:]])
        targets = torch.tensor([1] * k + [0] * k)
        return smooth_top1_svm(net.instance_classifiers[c](h[chosen]), targets)

    if not net.subtyping:
        return in_class(label)
    total = in_class(label)
    for c in range(net.n_classes):
        if c != label:
            top = torch.argsort(branch(c), descending=True)[: min(net.k_sample, len(bag))]
            total = total + smooth_top1_svm(net.instance_classifiers[c](h[top]), torch.zeros(len(top)).long())
    return total / net.n_classes


@pytest.mark.parametrize(
    ("model_type", "subtyping"), [("sb", False), ("sb", True), ("mb", False), ("mb", True)]
)
@pytest.mark.parametrize(("n", "k"), [(40, 8), (16, 8), (11, 5), (3, 1)])
def test_instance_loss_takes_b_patches_each_way_and_halves_small_bags(model_type, subtyping, n, k):
    net = _net(3, model_type, subtyping=subtyping)
    bag = _bag(n, seed=n)
    out = net.run(bag, instance_eval=True)
    for label in range(3):
        expected = _expected_instance_loss(net, bag, label, k)
        assert torch.allclose(out.instance_loss(label), expected, atol=1e-6)


def test_a_bag_of_one_patch_has_no_instance_loss_but_trains():
    net = _net(2).train()
    out = net.run(_bag(1), instance_eval=True)
    assert torch.equal(out.instance_losses, torch.zeros(2))
    loss = clam_loss(0.7)((out.logits, {"instance_losses": out.instance_losses}), torch.tensor([1]))
    loss.backward()
    assert net.attention_net[0].weight.grad is not None
    assert math.isclose(
        float(loss.detach()),
        0.7 * float(F.cross_entropy(out.logits.detach(), torch.tensor([1]))),
        rel_tol=1e-6,
    )


def test_total_loss_weighs_bag_and_instance_losses():
    logits = torch.tensor([[0.2, -0.3, 1.0]])
    per_label = torch.tensor([0.5, 1.5, 2.5])
    target = torch.tensor([2])
    expected = 0.7 * F.cross_entropy(logits, target) + 0.3 * 2.5
    assert torch.allclose(clam_loss()((logits, {"instance_losses": per_label}), target), expected)
    assert torch.allclose(
        clam_loss()(logits, target), F.cross_entropy(logits, target)
    )  # validation: no extras
    assert torch.allclose(CLAM.loss()((logits, {"instance_losses": per_label}), target), expected)
    with pytest.raises(ValueError, match=r"bag_weight must be in \[0, 1\]"):
        clam_loss(1.5)


def test_smooth_top1_svm_against_hand_computed_values():
    # one sample, s = (1, 0), y = 0: tau * log(exp(0) + exp((0 + 1 - 1) / tau)) = log 2
    assert math.isclose(
        float(smooth_top1_svm(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))), math.log(2), rel_tol=1e-6
    )
    # s = (0, 2), y = 0: log(exp(0) + exp(2 + 1 - 0)) = log(1 + e^3)
    value = float(smooth_top1_svm(torch.tensor([[0.0, 2.0]]), torch.tensor([0])))
    assert math.isclose(value, math.log(1 + math.e**3), rel_tol=1e-6)
    # tau = 2, s = (1, 0), y = 1: 2 * log(exp((1 + 1 - 0) / 2) + exp(0)) = 2 log(1 + e)
    value = float(smooth_top1_svm(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), tau=2.0))
    assert math.isclose(value, 2 * math.log(1 + math.e), rel_tol=1e-6)
    # a lead of 10 >= log(1000): the hard SVM, max_j(s_j + [j != y]) - s_y
    assert float(smooth_top1_svm(torch.tensor([[10.0, 0.0]]), torch.tensor([0]))) == 0.0
    assert math.isclose(
        float(smooth_top1_svm(torch.tensor([[0.0, 10.0]]), torch.tensor([0]))), 11.0, rel_tol=1e-6
    )
    # the mean over a batch, and alpha scales the margin
    batch = smooth_top1_svm(torch.tensor([[1.0, 0.0], [0.0, 10.0]]), torch.tensor([0, 0]))
    assert math.isclose(float(batch), (math.log(2) + 11.0) / 2, rel_tol=1e-6)
    value = float(smooth_top1_svm(torch.tensor([[0.0, 0.0]]), torch.tensor([0]), alpha=2.0))
    assert math.isclose(value, math.log(1 + math.e**2), rel_tol=1e-6)


def test_bad_bags_and_configs_are_refused_by_name():
    net = _net(2)
    with pytest.raises(
        ValueError, match=r"\(patches, 20\) features, got shape \(5, 16\) \(features from another"
    ):
        net.run(torch.zeros(5, 16))
    with pytest.raises(ValueError, match="the bag holds no patches"):
        net.run(torch.zeros(0, EMBED))
    for kw, message in [
        (dict(num_classes=1), "at least 2 classes"),
        (dict(model_type="xx"), "model_type must be 'sb' or 'mb'"),
        (dict(size="huge"), "size must be one of small, big"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(instance_loss="hinge"), "instance_loss must be one of svm, ce"),
        (dict(k_sample=0), "k_sample must be a positive whole number"),
    ]:
        with pytest.raises(ValueError, match=message):
            ClamNet(**{"embed_dim": EMBED, **kw})


def test_cross_entropy_instance_loss():
    net = _net(2, instance_loss="ce")
    bag = _bag(30)
    h = _hidden(net, bag)
    order = torch.argsort(net.run(bag).attention[0], descending=True)
    chosen = torch.cat([order[:8], order[-8:]])
    expected = F.cross_entropy(net.instance_classifiers[1](h[chosen]), torch.tensor([1] * 8 + [0] * 8))
    assert torch.allclose(net.run(bag, instance_eval=True).instance_loss(1), expected, atol=1e-6)


def test_registered_specs_and_the_family():
    spec = get_spec("clam-sb")
    assert (spec.family, spec.aggregator, spec.output, spec.classes) == (
        "clam",
        "attention",
        "slide",
        ("normal", "tumour"),
    )
    assert spec.config["subtyping"] is False and spec.config["embed_dim"] == 1024
    assert (
        get_spec("clam-mb").config["model_type"] == "mb" and get_spec("clam-mb").config["subtyping"] is True
    )
    model = create_model("clam-mb")
    assert model.net.run(torch.zeros(4, 1024)).attention.shape == (3, 4)
    assert (CLAM.name, CLAM.input_kind, CLAM.data_sources, CLAM.best_metric, CLAM.best_mode) == (
        "clam", "bag", ("slide_table",), "val_loss", "min",
    )  # fmt: skip
    fields = {f.name: f for f in setting_fields(CLAM.settings)}
    assert "data" not in fields and "out" not in fields
    defaults = {name: fields[name].default for name in (
        "model_type", "gated", "size", "dropout", "k_sample", "bag_weight", "inst_loss", "lr", "weight_decay",
        "epochs", "patience", "min_epochs",
    )}  # fmt: skip
    assert defaults == dict(
        model_type="sb", gated=True, size="small", dropout=0.25, k_sample=8, bag_weight=0.7, inst_loss="svm",
        lr=2e-4, weight_decay=1e-5, epochs=200, patience=20, min_epochs=50,
    )  # fmt: skip
    assert fields["classes"].kind == "names" and fields["features_dir"].kind == "path"
    assert fields["val_fraction"].flag == "--val-fraction" and fields["k_sample"].help
