"""fit's hooks: a loss that sees all the forward returned, and the best checkpoint by a named metric."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from napari_pathology.models import create_model, load_checkpoint
from napari_pathology.training import LoopSettings, TrainingError, checkpoint_paths, fit, resume_state
from napari_pathology.training.loop import logits_of


def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.rand(2, 3, 32, 32, generator=g), torch.randint(0, 2, (2,), generator=g)


def run(job):
    try:
        while True:
            next(job)
    except StopIteration as stop:
        return stop.value


def tiny_fit(out: Path, steps: int = 3, **kw):
    torch.manual_seed(0)
    model = create_model("nuclear-density").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    settings = LoopSettings(steps, out, eval_every=1, log_every=1, precise_bn_batches=0)
    return fit(model, batches(), optimizer, settings, **kw)


def test_a_two_term_loss_sees_the_logits_and_what_else_the_forward_returned(tmp_path: Path) -> None:
    seen = []

    def forward(model, x):  # as an attention-MIL network: logits and an instance loss computed inside
        logits = model(x)
        return logits, {"instance_loss": logits.pow(2).mean()}

    def loss(output, targets):
        logits, extras = output
        bag = F.cross_entropy(logits, targets)
        total = 0.7 * bag + 0.3 * extras["instance_loss"]
        seen.append((logits.dtype, bag.item(), extras["instance_loss"].item(), total.item()))
        return total

    result = run(tiny_fit(tmp_path / "m.pt", loss=loss, forward=forward))
    losses = [row["loss"] for row in result.history if "loss" in row]
    assert len(seen) == len(losses) == 3
    for (dtype, bag, instance, total), logged in zip(seen, losses, strict=True):
        assert dtype == torch.float32 and instance > 0
        assert total == pytest.approx(0.7 * bag + 0.3 * instance)
        assert logged == pytest.approx(total)  # the step's loss is the hook's, not cross-entropy
        assert abs(logged - bag) > 1e-6

    # a mapping works too, and without a loss hook the default is cross-entropy of its logits
    as_dict = run(tiny_fit(tmp_path / "d.pt", forward=lambda m, x: {"logits": m(x), "attention": None}))
    plain = run(tiny_fit(tmp_path / "p.pt"))
    assert [r["loss"] for r in as_dict.history] == pytest.approx([r["loss"] for r in plain.history])


def test_logits_of_refuses_an_output_without_logits() -> None:
    logits = torch.zeros(2, 2)
    assert logits_of(logits) is logits and logits_of((logits, {})) is logits
    assert logits_of({"logits": logits}) is logits
    with pytest.raises(TrainingError, match=r"forward must return logits.*got str"):
        logits_of("logits")


def _validation(values: list[float], name: str = "val_loss"):
    calls = iter(values)
    return lambda model: {name: next(calls), "auc": 0.5}


def test_the_best_checkpoint_follows_min_on_a_metric_that_falls(tmp_path: Path) -> None:
    falling = run(tiny_fit(tmp_path / "a.pt", validate=_validation([3.0, 2.0, 1.0]), best_mode="min",
                           best_metric="val_loss"))  # fmt: skip
    assert falling.metrics["step"] == 3 and falling.metrics["val_loss"] == 1.0
    assert load_checkpoint(falling.best).metrics["val_loss"] == 1.0
    # the default (highest "score" wins, as before) and max on the same metric keep the first
    rising = run(tiny_fit(tmp_path / "b.pt", validate=_validation([3.0, 2.0, 1.0]), best_metric="val_loss"))
    assert rising.metrics["step"] == 1
    dip = run(tiny_fit(tmp_path / "c.pt", validate=_validation([2.0, 1.0, 3.0]), best_mode="min",
                       best_metric="val_loss"))  # fmt: skip
    assert dip.metrics["step"] == 2
    old = run(tiny_fit(tmp_path / "d.pt", validate=_validation([0.1, 0.3, 0.2], "score")))
    assert old.metrics["step"] == 2
    nan = run(tiny_fit(tmp_path / "e.pt", validate=_validation([float("nan"), 2.0, 3.0]), best_mode="min",
                       best_metric="val_loss"))  # fmt: skip
    assert nan.metrics["step"] == 2  # a NaN is kept only until a number comes


def test_a_bad_metric_mode_or_resume_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="best_mode must be 'max' or 'min', got 'lowest'"):
        next(tiny_fit(tmp_path / "m.pt", best_mode="lowest"))
    with pytest.raises(TrainingError, match=r"no 'val_auc' .*only 'val_loss', 'auc'"):
        run(tiny_fit(tmp_path / "m.pt", validate=_validation([1.0]), best_metric="val_auc"))
    out = tmp_path / "r.pt"
    run(tiny_fit(out, steps=1, validate=_validation([1.0]), best_metric="val_loss", best_mode="min"))
    state = resume_state(out)
    assert (state["best_metric"], state["best_mode"], state["best_score"]) == ("val_loss", "min", -1.0)
    with pytest.raises(TrainingError, match=r"chosen by val_loss \(min\), this job chooses by auc \(max\)"):
        run(tiny_fit(out, steps=2, validate=_validation([1.0]), best_metric="auc", resume=state))
    resumed = run(tiny_fit(out, steps=2, validate=_validation([0.5]), best_metric="val_loss",
                           best_mode="min", resume=state))  # fmt: skip
    assert resumed.metrics["step"] == 2 and checkpoint_paths(out)[0].is_file()


def test_micro_batches_accumulate_into_one_step(tmp_path: Path) -> None:
    sizes = []

    def forward(model, x):
        sizes.append(len(x))
        return model(x)

    torch.manual_seed(0)
    model = create_model("nuclear-density").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    settings = LoopSettings(
        2, tmp_path / "m.pt", eval_every=1, log_every=1, precise_bn_batches=0, micro_batch=1
    )
    result = run(fit(model, batches(), optimizer, settings, forward=forward))
    assert result.step == 2 and sizes == [1, 1, 1, 1]  # two items per batch, one per forward
    with pytest.raises(TrainingError, match="micro_batch"):
        LoopSettings(2, tmp_path / "m.pt", micro_batch=0)


def test_shrink_is_asked_after_out_of_memory_with_one_item(tmp_path: Path) -> None:
    state = {"big": True, "asked": 0}

    def forward(model, x):
        if state["big"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return model(x)

    def shrink():
        state["asked"] += 1
        state["big"] = False
        return "retrying with smaller tiles"

    events = []
    job = tiny_fit(tmp_path / "m.pt", steps=2, forward=forward, shrink=shrink)
    try:
        while True:
            events.append(next(job))
    except StopIteration as stop:
        result = stop.value
    assert result.step == 2 and state["asked"] == 1
    assert any("retrying with smaller tiles" in e.message for e in events if e.kind == "log")
    state["big"] = True  # shrink can do no more: the job ends with a clear error, the checkpoints stay
    with pytest.raises(TrainingError, match="out of memory"):
        run(tiny_fit(tmp_path / "n.pt", steps=2, forward=forward, shrink=lambda: None))
