"""CLAM checkpoints in and out: every key layout CLAM wrote, inferred, equal to an independent reference."""

from __future__ import annotations

import pytest
import torch
from clam_reference import ReferenceClam
from torch import nn

from napari_pathology.families.clam.interop import (
    clam_state_dict,
    export_clam_checkpoint,
    import_clam_checkpoint,
)
from napari_pathology.families.clam.model import ClamNet
from napari_pathology.models.registry import ModelError, PathologyModel, create_model, save_checkpoint

EMBED = 24  # any embedding size; L and D are CLAM's


def _bag(n: int = 30, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, EMBED, generator=torch.Generator().manual_seed(seed))


def _reference(seed: int = 0, **kw) -> ReferenceClam:
    torch.manual_seed(seed)
    return ReferenceClam(embed_dim=EMBED, **kw).eval()


def _assert_same(model: PathologyModel, ref: ReferenceClam, bag: torch.Tensor) -> None:
    with torch.no_grad():
        ours = model.net.run(bag)
        logits, probs, attention = ref(bag)
    assert torch.allclose(ours.probabilities, probs, atol=1e-5)
    assert torch.allclose(ours.attention, attention, atol=1e-5)
    assert torch.allclose(ours.logits, logits, atol=1e-5)
    assert torch.allclose(model.predict_proba(bag), probs, atol=1e-5)


#: (reference options, how CLAM saved it, expected inferred config)
LAYOUTS = {
    "sb-gated-small": (dict(), None, dict(model_type="sb", gate=True, size="small", n=2)),
    "mb-plain-big-3": (
        dict(mb=True, gate=False, D=384, n_classes=3),
        None,
        dict(model_type="mb", gate=False, size="big", n=3),
    ),
    "sb-plain-no-dropout": (
        dict(gate=False, dropout=False),
        None,
        dict(model_type="sb", gate=False, size="small", n=2),
    ),
    "mb-gated-old-index-2": (
        dict(mb=True, n_classes=3, dropout=False, legacy_fc=True),
        None,
        dict(model_type="mb", gate=True, size="small", n=3),
    ),
    "sb-plain-old-index-2": (
        dict(gate=False, dropout=False, legacy_fc=True),
        None,
        dict(model_type="sb", gate=False, size="small", n=2),
    ),
    "sb-big-dataparallel-svm": (
        dict(D=384, svm_loss=True),
        "module",
        dict(model_type="sb", gate=True, size="big", n=2),
    ),
    "mb-attention-wrapped": (
        dict(mb=True, n_classes=3, svm_loss=True),
        "attention_net",
        dict(model_type="mb", gate=True, size="small", n=3),
    ),
    "sb-3-classes": (dict(n_classes=3), None, dict(model_type="sb", gate=True, size="small", n=3)),
    "torch-before-1.6-file": (
        dict(svm_loss=True),
        "old-file",
        dict(model_type="sb", gate=True, size="small", n=2),
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_clam_key_layout_is_inferred_and_matches_the_reference(tmp_path, layout):
    options, wrapped, expected = LAYOUTS[layout]
    ref = _reference(**options)
    if wrapped == "module":
        state = nn.DataParallel(ref).state_dict()  # every name starts with "module."
        assert all(k.startswith("module.") for k in state)
    elif wrapped == "attention_net":
        ref.attention_net = nn.DataParallel(ref.attention_net)  # older relocate() on several GPUs
        state = ref.state_dict()
        assert any(k.startswith("attention_net.module.") for k in state)
        ref.attention_net = ref.attention_net.module
    else:
        state = ref.state_dict()
    if options.get("svm_loss"):
        assert any(k.startswith(("instance_loss_fn.", "module.instance_loss_fn.")) for k in state)
    if options.get("legacy_fc"):
        assert any(k.startswith("attention_net.2.") for k in state)
    path = tmp_path / "s_0_checkpoint.pt"
    torch.save(state, path, _use_new_zipfile_serialization=wrapped != "old-file")  # CLAM's torch < 1.6
    model = import_clam_checkpoint(path)
    net = model.net
    assert (net.model_type, net.gate, net.n_classes, net.embed_dim) == (
        expected["model_type"], expected["gate"], expected["n"], EMBED,
    )  # fmt: skip
    assert model.spec.config["size"] == expected["size"]
    assert (net.hidden, net.attention_dim) == (512, 384 if expected["size"] == "big" else 256)
    assert model.spec.classes == tuple(f"class {k}" for k in range(expected["n"]))
    assert model.spec.family == "clam" and model.source == str(path)
    for n in (30, 1, 5):
        _assert_same(model, ref, _bag(n, seed=n))


def test_custom_sizes_and_class_names(tmp_path):
    ref = _reference(L=64, D=32, n_classes=3, mb=True)
    torch.save(ref.state_dict(), tmp_path / "c.pt")
    model = import_clam_checkpoint(tmp_path / "c.pt", classes="normal, LUAD ,LUSC")
    assert model.spec.classes == ("normal", "LUAD", "LUSC")
    assert (model.net.hidden, model.net.attention_dim) == (64, 32)
    _assert_same(model, ref, _bag())
    with pytest.raises(
        ModelError, match=r"has 3 classes; give 3 distinct class names \(--classes\), not \['a', 'b'\]"
    ) as info:
        import_clam_checkpoint(tmp_path / "c.pt", classes=["a", "b"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("options", "config"),
    [
        (dict(), dict(model_type="sb", gate=True, dropout=0.25)),
        (dict(gate=False), dict(model_type="sb", gate=False, dropout=0.25)),
        (dict(gate=False, dropout=False), dict(model_type="sb", gate=False, dropout=0.0)),
        (dict(mb=True, n_classes=3, D=384), dict(model_type="mb", gate=True, dropout=0.25, size="big")),
        (
            dict(mb=True, n_classes=3, gate=False, dropout=False),
            dict(model_type="mb", gate=False, dropout=0.0),
        ),
    ],
)
def test_export_loads_strictly_into_clams_modules_and_back(tmp_path, options, config):
    n = options.get("n_classes", 2)
    torch.manual_seed(3)
    net = ClamNet(n, embed_dim=EMBED, **config).eval()
    path = export_clam_checkpoint(net, tmp_path / "s_0_checkpoint.pt")
    state = torch.load(path, weights_only=True)
    assert not any(k.startswith(("net.", "module.")) for k in state)
    ref = _reference(**options)
    ref.load_state_dict(state, strict=True)  # CLAM's own module tree takes it as it is
    model = import_clam_checkpoint(path, classes=[f"c{k}" for k in range(n)])
    _assert_same(model, ref, _bag())
    again = clam_state_dict(model)
    assert again.keys() == state.keys()
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_export_refuses_other_families():
    with pytest.raises(ModelError, match="only 'clam' models can be exported"):
        clam_state_dict(nn.Linear(2, 2))


class _Payload:
    """Pickled as a global: torch.load(weights_only=True) must refuse it without running it."""

    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("tensor", r"holds one tensor \(3, 4\), not a state dict; a CLAM checkpoint is a bare state dict"),
        (
            "random",
            r"found bias, weight \(2 tensors\); a CLAM checkpoint is a bare state dict with attention_net",
        ),
        ("tile", r"found conv1.weight, fc.bias, fc.weight .*; a CLAM checkpoint"),
        ("nested", r"holds non-tensor entries epoch, model; a CLAM checkpoint"),
        ("hostile", r"holds code \(pickled objects\)"),
        ("truncated", r"not a PyTorch checkpoint file, or a corrupt or truncated one"),
        ("text", r"not a PyTorch checkpoint file \(a text file\); a CLAM checkpoint is a bare state dict"),
        ("ours", r"it is a napari-pathology checkpoint, not CLAM's"),
        (
            "torn-mb",
            r"its weights do not make one CLAM-MB with 3 classes: missing instance_classifiers.2.weight",
        ),
        ("mb-branches", r"CLAM-MB with 3 classifiers but 1 attention branches"),
        ("missing", r"no such file"),
    ],
)
def test_files_that_are_not_clam_checkpoints_are_refused_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "x.pt"
    mb = _reference(mb=True, n_classes=3).state_dict()
    if content == "tensor":
        torch.save(torch.zeros(3, 4), path)
    elif content == "random":
        torch.save({"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, path)
    elif content == "tile":
        torch.save(
            {
                "conv1.weight": torch.zeros(8, 3, 3, 3),
                "fc.weight": torch.zeros(2, 8),
                "fc.bias": torch.zeros(2),
            },
            path,
        )
    elif content == "nested":
        torch.save({"epoch": 3, "model": {"attention_net.0.weight": torch.zeros(2, 2)}}, path)
    elif content == "hostile":
        torch.save({"attention_net.0.weight": _Payload()}, path)
    elif content == "truncated":
        torch.save(_reference().state_dict(), path)
        path.write_bytes(path.read_bytes()[:300])
    elif content == "text":
        path.write_text("slide,label\na.svs,tumour\n")
    elif content == "ours":
        save_checkpoint(create_model("clam-sb"), path)
    elif content == "torn-mb":
        torch.save({k: v for k, v in mb.items() if not k.startswith("instance_classifiers.2.")}, path)
    elif content == "mb-branches":
        sb = _reference(n_classes=3).state_dict()
        sb = {k: v for k, v in sb.items() if not k.startswith("classifiers")}
        sb.update({k: v for k, v in mb.items() if k.startswith("classifiers")})
        torch.save(sb, path)
    if content == "missing":
        path = tmp_path / "absent.pt"
    with pytest.raises(ModelError, match=message) as info:
        import_clam_checkpoint(path)
    assert str(info.value).startswith(f"Cannot import CLAM checkpoint {path.name}: ")
    assert "\n" not in str(info.value)
    assert "this must never run" not in capsys.readouterr().out
